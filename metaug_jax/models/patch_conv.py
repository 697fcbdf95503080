"""A convolution whose weight derivative is computed as GEMMs over image patches.

Why: on XLA:CPU the weight gradient of a large-stride input conv is slow. AlexNet-half's
conv1 (11x11, stride 4, 1-3 input channels at 224x224, docs/metaug.md §3.1) runs its
backward-filter convolution at 11-18 GFLOP/s, against 43-61 GFLOP/s for its forward and ~195
for a matmul (`experiments/results/conv_layers_cpu.md`). Summed over the three views, it is about a
quarter of a plain training step, and MetAug differentiates the encoder three times per step.

How: with blocks of (sh x sw) pixels moved into channels (space-to-depth), a stride-s k x k
conv is a stride-1 ceil(k/s) x ceil(k/s) conv. Its patches are a few shifted slices, so the
conv is one GEMM (rows, P) x (P, out) per chunk of images. `conv` keeps XLA's convolution for
the value and for the input tangent, and uses that chunked GEMM for the weight tangent. Its
transpose, the weight gradient, is then an accumulation of (P, rows) x (rows, out) GEMMs over
chunks, with the patches of each chunk rebuilt in the backward pass (`jax.checkpoint`), so no
patch tensor is kept. Everything is plain JAX under a `custom_jvp`, so `grad`, `jvp`,
`linearize`, `vmap` and higher derivatives all work; the values equal XLA's to float rounding.

It pays only for large-stride convs with few input channels. For the stride-1 and stride-2
convs of the other encoders it was measured slower, and `build_encoder` does not use it
there (`model.conv1_weight_grad`).
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

# Images per GEMM. Small chunks keep each chunk's patches in cache; 2 was fastest at batch 64
# on a 2-core CPU (1, 2, 4, 8, 16, 32 tried).
DEFAULT_CHUNK = 2
_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, strides, pads, precision):
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC,
                                      precision=precision)


def _blocks(kernel_hw: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
  """Kernel size in space-to-depth blocks: ceil(k / s) per spatial dimension."""
  return tuple(-(-k // s) for k, s in zip(kernel_hw, strides))


def space_to_depth_patches(x: jax.Array, kernel_hw, strides, pads, out_hw) -> jax.Array:
  """(n, Ho, Wo, bh*bw*sh*sw*C) patches: for output (i, j), the bh x bw blocks of sh x sw
  pixels starting at padded input row i*sh, column j*sw (zero beyond the padded image)."""
  (sh, sw), (bh, bw), (ho, wo) = strides, _blocks(kernel_hw, strides), out_hw
  (top, _), (left, _) = pads
  n, height, width, channels = x.shape
  hp, wp = (ho - 1 + bh) * sh, (wo - 1 + bw) * sw
  x = jnp.pad(x, ((0, 0), (top, max(0, hp - height - top)), (left, max(0, wp - width - left)),
                  (0, 0)))[:, :hp, :wp]
  x = x.reshape(n, hp // sh, sh, wp // sw, sw, channels).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, hp // sh, wp // sw, sh * sw * channels)
  return jnp.concatenate([x[:, a:a + ho, b:b + wo] for a in range(bh) for b in range(bw)],
                         axis=-1)


def space_to_depth_kernel(kernel: jax.Array, strides) -> jax.Array:
  """The HWIO kernel as the (bh*bw*sh*sw*C, out) matrix matching `space_to_depth_patches`
  (zero rows for the taps past k in the last block)."""
  kh, kw, channels, out = kernel.shape
  (sh, sw), (bh, bw) = strides, _blocks((kh, kw), strides)
  kernel = jnp.pad(kernel, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0), (0, 0)))
  kernel = kernel.reshape(bh, sh, bw, sw, channels, out).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(bh * bw * sh * sw * channels, out)


def _chunk_size(batch: int, chunk: int) -> int:
  """The largest divisor of `batch` that is at most `chunk`."""
  return next(c for c in range(min(chunk, batch), 0, -1) if batch % c == 0)


def patch_gemm_conv(x: jax.Array, kernel: jax.Array, strides, pads, out_hw,
                    precision=None, chunk: int = DEFAULT_CHUNK) -> jax.Array:
  """The conv as chunked patch GEMMs (each chunk's patches rematerialised when transposed)."""
  n = x.shape[0]
  c = _chunk_size(n, chunk)
  matrix = space_to_depth_kernel(kernel, strides)

  @jax.checkpoint
  def one_chunk(xc, matrix):
    patches = space_to_depth_patches(xc, kernel.shape[:2], strides, pads, out_hw)
    return jnp.einsum("nijk,ko->nijo", patches, matrix, precision=precision)

  y = jax.lax.map(lambda xc: one_chunk(xc, matrix), x.reshape(n // c, c, *x.shape[1:]))
  return y.reshape(n, *out_hw, kernel.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, precision, chunk):
  return _lax_conv(x, kernel, strides, pads, precision)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(strides, pads, precision, chunk, primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = _conv(x, kernel, strides, pads, precision, chunk)
  parts = []
  if not isinstance(dkernel, jax.custom_derivatives.SymbolicZero):
    parts.append(patch_gemm_conv(x, dkernel, strides, pads, y.shape[1:3], precision, chunk))
  if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
    parts.append(_lax_conv(dx, kernel, strides, pads, precision))
  dy = functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(y)
  return y, dy


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
         pads: Sequence[tuple[int, int]], precision=None,
         chunk: int = DEFAULT_CHUNK) -> jax.Array:
  """NHWC x HWIO conv with explicit ((top, bottom), (left, right)) pads; same value and
  derivatives as `lax.conv_general_dilated`, weight derivative by chunked patch GEMMs."""
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"patch_conv.conv needs NHWC inputs and an HWIO kernel with matching "
                     f"channels, got {x.shape} and {kernel.shape}")
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _conv(x, kernel, tuple(int(s) for s in strides), pads, precision, int(chunk))


def flax_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count: int = 1, precision=None,
                              preferred_element_type: Optional[jnp.dtype] = None):
  """`lax.conv_general_dilated`'s signature, for `nn.Conv(conv_general_dilated=...)`.

  Plain 2-D NHWC convs (no dilation or groups) go through `conv`; any other call is an
  error, since the encoders only use it for their input conv.
  """
  plain = (lhs.ndim == 4 and feature_group_count == 1
           and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and preferred_element_type is None
           and _is_nhwc(dimension_numbers, lhs.ndim))
  if not plain:
    raise ValueError("patch_conv supports 2-D NHWC/HWIO convs with no dilation, groups or "
                     "preferred_element_type; use the XLA conv "
                     "(model.conv1_weight_grad='xla') for this layer")
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return conv(lhs, rhs, window_strides, padding, precision)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  """Whether lax would read `dimension_numbers` (None, strings or specs) as NHWC/HWIO/NHWC."""
  specs = lambda dn: jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dn)
  return specs(dimension_numbers) == specs(_NHWC)
