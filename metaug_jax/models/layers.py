"""Small shared building blocks: NaN-safe L2 normalisation, PyTorch-like initialisers, BN.

Everything here is differentiated twice (MetAug's meta-gradient, docs/metaug.md §6), so each
helper is smooth or has a finite gradient at its non-smooth points (docs/implementation.md §4.5).
"""

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from metaug_jax.models import patch_conv

Dtype = Any
Padding = Union[str, int, Sequence[tuple[int, int]]]

# PyTorch's default Conv/Linear weight init, Kaiming-uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in))
# (docs/metaug.md, decision A12): variance_scaling(scale, "fan_in", "uniform") draws
# U(+-sqrt(3 * scale / fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def output_dtype(compute_dtype) -> jnp.dtype:
  """Outputs are at least float32 (bfloat16 compute -> float32; float64 stays float64)."""
  return jnp.promote_types(compute_dtype, jnp.float32)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Divides x by its L2 norm along `axis`; finite value and gradients (any order) at x = 0.

  Computes x * rsqrt(max(|x|^2, eps)) (docs/implementation.md §4.5): at an all-zero row the
  max selects the constant eps, so the result is 0 and every derivative is finite (not NaN as
  with x/|x|).
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init U(+-1/sqrt(fan_in)) (decision A12); needs the layer's fan_in."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dense(features: int, in_features: int, *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.Dense:
  """An nn.Dense initialised like torch.nn.Linear (decision A12); `in_features` is its fan_in."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_features),
                  name=name)


def _explicit_padding(padding: Padding) -> Padding:
  """An int p means p pixels on each side (PyTorch's `padding=p`)."""
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return padding


WEIGHT_GRADS = ("xla", "patches")


def conv(features: int, kernel_size: int, in_features: int, *, strides: int = 1,
         padding: Padding = "SAME", use_bias: bool = False, dtype: Dtype = jnp.float32,
         weight_grad: str = "xla", name: Optional[str] = None) -> nn.Conv:
  """A square NHWC nn.Conv initialised like torch.nn.Conv2d (decision A12); no bias by default.

  weight_grad="patches" computes the kernel's derivative as chunked patch GEMMs
  (`patch_conv`: faster on CPU for a large-stride input conv); same value, parameters and
  derivatives as "xla".
  """
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
  fan_in = kernel_size * kernel_size * in_features
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=_explicit_padding(padding), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=torch_kernel_init,
                 bias_init=torch_bias_init(fan_in), name=name,
                 conv_general_dilated=(patch_conv.flax_conv_general_dilated
                                       if weight_grad == "patches" else None))


def batch_norm(train: bool, axis_name: Optional[str] = None, dtype: Dtype = jnp.float32,
               name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch defaults (decision A12: momentum 0.1 = Flax 0.9, eps 1e-5).

  In train mode the batch statistics are averaged over the pmap/shard_map axis `axis_name`
  (SyncBN); in eval mode the running averages are used and no axis is needed.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      axis_name=axis_name if train else None, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _pool_pads(x: jax.Array, window: int, stride: int, padding: Padding) -> tuple:
  """Explicit ((lo, hi), (lo, hi)) spatial pads of a square NHWC max pool."""
  padding = _explicit_padding(padding)
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(x.shape[1:3], (window, window), (stride, stride),
                                         padding))
  return tuple(tuple(p) for p in padding)


def _window_slices(x: jax.Array, window: int, stride: int, out_hw: tuple) -> list:
  """The window*window strided slices of an (already padded) NHWC map, row-major offsets."""
  n, _, _, c = x.shape
  return [jax.lax.slice(x, (0, i, j, 0),
                        (n, i + stride * (out_hw[0] - 1) + 1, j + stride * (out_hw[1] - 1) + 1,
                         c), (1, stride, stride, 1))
          for i in range(window) for j in range(window)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: int, stride: int, pads: tuple) -> jax.Array:
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                               (1, window, window, 1), (1, stride, stride, 1),
                               ((0, 0),) + pads + ((0, 0),))


@_max_pool.defjvp
def _max_pool_jvp(window, stride, pads, primals, tangents):
  """The tangent of each output is the tangent of the first maximal input of its window.

  Same derivative as XLA's own max-pool gradient (select-and-scatter picks the first maximum
  too), but written as masked strided slices: their transposes (reverse mode) and derivatives
  (MetAug's second-order pass) are cheap elementwise ops. On CPU, a pool's forward+backward is
  about 3x faster this way than through select-and-scatter (experiments/benchmark.py).
  """
  (x,), (t,) = primals, tangents
  y = _max_pool(x, window, stride, pads)
  full = ((0, 0),) + pads + ((0, 0),)
  xp = jnp.pad(x, full, constant_values=-jnp.inf)
  tp = jnp.pad(t, full)
  taken = jnp.zeros(y.shape, bool)
  ty = jnp.zeros(y.shape, t.dtype)
  for xs, ts in zip(_window_slices(xp, window, stride, y.shape[1:3]),
                    _window_slices(tp, window, stride, y.shape[1:3])):
    first = (xs == y) & ~taken
    ty = ty + jnp.where(first, ts, jnp.zeros_like(ts))
    taken = taken | first
  return y, ty


def max_pool(x: jax.Array, window: int, stride: int, padding: Padding = "VALID") -> jax.Array:
  """Square NHWC max pool (like nn.max_pool) whose derivatives avoid select-and-scatter.

  `padding` is "VALID", "SAME", an int p (p pixels each side) or explicit pairs.
  """
  return _max_pool(x, window, stride, _pool_pads(x, window, stride, padding))


class ConvBNReLU(nn.Module):
  """Conv (no bias) -> BN -> ReLU -> optional max pool: one conv block of the encoders.

  A module of its own so that encoders can wrap it in `nn.remat` (rematerialisation is useful
  on sub-blocks, docs/implementation.md §4.6). `pool` is (window, stride) or None.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Padding = "SAME"
  pool: Optional[tuple[int, int]] = None
  pool_padding: Padding = "VALID"
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  weight_grad: str = "xla"   # see `conv`

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel_size, x.shape[-1], strides=self.strides,
             padding=self.padding, dtype=self.dtype, weight_grad=self.weight_grad,
             name="conv")(x)
    x = batch_norm(train, self.axis_name, self.dtype, name="bn")(x)
    x = nn.relu(x)
    if self.pool is not None:
      window, stride = self.pool
      x = max_pool(x, window, stride, self.pool_padding)
    return x


def maybe_remat(module_cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  """`nn.remat(module_cls)` with a static `train` (positional arg 2 after self, x) if remat."""
  if remat:
    return nn.remat(module_cls, static_argnums=(2,))
  return module_cls
