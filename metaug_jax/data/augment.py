"""On-device image augmentation in pure JAX: affine resampling, crops, colour ops, Lab.

Every function works on ONE float image (H, W, C) with values in [0, 1] (unless stated), takes
an explicit PRNG key when random, and has static output shapes, so it can be jit'ed and
vmap'ed over a batch (see `views.py`).

Affine convention: a 2x3 matrix M maps an OUTPUT pixel coordinate (y, x) to the INPUT pixel
coordinate it samples, `[y_in, x_in] = M @ [y_out, x_out, 1]`, with integer coordinates at pixel
centres (row-major, y first, like `map_coordinates`). Crops, resizes and flips are therefore
centre-aligned as in PIL/torchvision (`align_corners=False`).
"""

import math
from typing import Sequence, Union

import chex
import jax
import jax.numpy as jnp

LAB_MEAN = (50.0, 6.025, -6.6895)        # docs/metaug.md §2.2: midpoints of the L, a, b ranges
LAB_STD = (50.0, 92.208, 101.1675)       # docs/metaug.md §2.2: half-ranges of the L, a, b ranges
_D65_WHITE = (0.95047, 1.0, 1.08883)     # CIE XYZ of the D65 2-degree white (skimage)
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_GREY_WEIGHTS = (0.299, 0.587, 0.114)    # ITU-R 601 luma, as PIL / torchvision
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---- affine geometry ---------------------------------------------------------------------


def affine_sample(image: jax.Array, matrix: jax.Array, out_size: Union[int, Sequence[int]],
                  mode: str = "nearest") -> jax.Array:
  """Bilinearly samples `image` (H, W, C) on an (out, out) grid mapped through `matrix` (2, 3).

  The default mode 'nearest' repeats the edge pixel outside the image: up-sampling a whole
  image then has no dark rim (its outermost output pixels sample up to half a pixel beyond the
  input), and rotated/translated images get smeared edges instead of black wedges. Pass
  mode='constant' to fill with 0 instead. There is no anti-aliasing: strong down-scaling
  aliases (unlike PIL's resize), which does not arise when up-sampling small images.
  """
  chex.assert_rank(image, 3)
  chex.assert_shape(matrix, (2, 3))
  out_h, out_w = _pair(out_size)
  image = jnp.asarray(image, jnp.float32)
  matrix = jnp.asarray(matrix, jnp.float32)
  ys, xs = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32),
                        jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
  # Element-wise (not a matmul) so that no TF32/bf16 matmul precision applies on accelerators.
  y_in = matrix[0, 0] * ys + matrix[0, 1] * xs + matrix[0, 2]
  x_in = matrix[1, 0] * ys + matrix[1, 1] * xs + matrix[1, 2]
  sample = lambda channel: jax.scipy.ndimage.map_coordinates(
      channel, [y_in, x_in], order=1, mode=mode)
  return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def _linear_interpolation_weights(coordinates: jax.Array, size: int, mode: str) -> jax.Array:
  """(len(coordinates), size) weights of 1-D linear interpolation at `coordinates`.

  Row i holds 1 - f and f at floor(c_i) and floor(c_i) + 1 (f = c_i - floor(c_i)); indices
  beyond the edge are clamped (mode 'nearest') or dropped (mode 'constant', i.e. zero fill),
  as in `jax.scipy.ndimage.map_coordinates(order=1)`.
  """
  lower = jnp.floor(coordinates)
  upper_weight = coordinates - lower
  lower = lower.astype(jnp.int32)
  weights = jnp.zeros((coordinates.shape[0], size), jnp.float32)
  for index, weight in ((lower, 1.0 - upper_weight), (lower + 1, upper_weight)):
    if mode == "nearest":
      index = jnp.clip(index, 0, size - 1)
    weights = weights + weight[:, None] * jax.nn.one_hot(index, size, dtype=jnp.float32)
  return weights


def axis_aligned_sample(image: jax.Array, matrix: jax.Array,
                        out_size: Union[int, Sequence[int]], mode: str = "nearest") -> jax.Array:
  """`affine_sample` for a matrix without rotation or shear (crops, resizes, flips).

  The bilinear sampling then separates into rows and columns: two small matrix products
  (out x H and out x W interpolation weights) instead of 4 gathers per output pixel and
  channel, ~10x less time for AlexNet-half's 32 -> 224 views on CPU. Equal to
  `affine_sample` up to float rounding; the matrix's off-diagonal entries are ignored, so
  the caller must know they are 0.
  """
  chex.assert_rank(image, 3)
  chex.assert_shape(matrix, (2, 3))
  if mode not in ("nearest", "constant"):
    raise ValueError(f"mode must be 'nearest' or 'constant', got {mode!r}")
  out_h, out_w = _pair(out_size)
  image = jnp.asarray(image, jnp.float32)
  matrix = jnp.asarray(matrix, jnp.float32)
  rows = matrix[0, 0] * jnp.arange(out_h, dtype=jnp.float32) + matrix[0, 2]
  cols = matrix[1, 1] * jnp.arange(out_w, dtype=jnp.float32) + matrix[1, 2]
  row_weights = _linear_interpolation_weights(rows, image.shape[0], mode)
  col_weights = _linear_interpolation_weights(cols, image.shape[1], mode)
  return jnp.einsum("oh,hwc,pw->opc", row_weights, image, col_weights, precision=_HIGHEST)


def identity_matrix() -> jax.Array:
  """The 2x3 affine matrix that samples every output pixel at the same input pixel."""
  return jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], jnp.float32)


def crop_matrix(top, left, height, width, out_size: Union[int, Sequence[int]],
                flip=False) -> jax.Array:
  """Maps an (out, out) grid onto the box [top, top+height) x [left, left+width) of the input.

  `flip` (a bool or a traced bool) mirrors the box horizontally. All box values may be traced
  and fractional.
  """
  out_h, out_w = _pair(out_size)
  sy = jnp.asarray(height, jnp.float32) / out_h
  sx = jnp.asarray(width, jnp.float32) / out_w
  ty = top + 0.5 * sy - 0.5
  tx_plain = left + 0.5 * sx - 0.5
  tx_flip = left + width - 0.5 * sx - 0.5
  flip = jnp.asarray(flip, bool)
  sx = jnp.where(flip, -sx, sx)
  tx = jnp.where(flip, tx_flip, tx_plain)
  zero = jnp.zeros((), jnp.float32)
  return jnp.stack([jnp.stack([sy, zero, ty]), jnp.stack([zero, sx, tx])]).astype(jnp.float32)


def resize_matrix(in_hw: Sequence[int], out_size: Union[int, Sequence[int]]) -> jax.Array:
  """Maps an (out, out) grid onto the whole input image: a plain (aspect-changing) resize."""
  return crop_matrix(0.0, 0.0, float(in_hw[0]), float(in_hw[1]), out_size)


def compose_affine(outer: jax.Array, inner: jax.Array) -> jax.Array:
  """The 2x3 matrix of p -> outer(inner(p)), i.e. apply `inner` first."""
  chex.assert_shape([outer, inner], (2, 3))
  linear = jnp.dot(outer[:, :2], inner[:, :2], precision=_HIGHEST)
  offset = jnp.dot(outer[:, :2], inner[:, 2], precision=_HIGHEST) + outer[:, 2]
  return jnp.concatenate([linear, offset[:, None]], axis=1)


CROP_UNIFORMS = 5     # uniforms consumed by resized_crop_matrix_from_uniforms
JITTER_UNIFORMS = 3   # uniforms consumed by affine_jitter_matrix_from_uniforms


def resized_crop_matrix_from_uniforms(u: jax.Array, in_hw: Sequence[int],
                                      out_size: Union[int, Sequence[int]],
                                      scale: Sequence[float] = (0.08, 1.0),
                                      ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                                      flip: bool = False) -> jax.Array:
  """`random_resized_crop_matrix` as a function of 5 uniforms in [0, 1) instead of a key.

  Lets a caller draw all the scalars of an example in one RNG call (every RNG call adds
  threefry code to compile).
  """
  chex.assert_shape(u, (CROP_UNIFORMS,))
  in_h, in_w = float(in_hw[0]), float(in_hw[1])
  area = in_h * in_w * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
  width = jnp.clip(jnp.sqrt(area * aspect), 1.0, in_w)
  height = jnp.clip(jnp.sqrt(area / aspect), 1.0, in_h)
  top = u[2] * (in_h - height)
  left = u[3] * (in_w - width)
  do_flip = (u[4] < 0.5) if flip else False
  return crop_matrix(top, left, height, width, out_size, do_flip)


def random_resized_crop_matrix(key: chex.PRNGKey, in_hw: Sequence[int],
                               out_size: Union[int, Sequence[int]],
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                               flip: bool = False) -> jax.Array:
  """A torchvision-style RandomResizedCrop (+ horizontal flip with p=0.5 if `flip`) as a matrix.

  The box area is a uniform fraction `scale` of the image, the aspect ratio w/h is log-uniform
  in `ratio`; instead of torchvision's rejection loop (data-dependent control flow), a box that
  does not fit is clipped to the image, and its position is uniform over the valid range.
  """
  return resized_crop_matrix_from_uniforms(jax.random.uniform(key, (CROP_UNIFORMS,)), in_hw,
                                           out_size, scale, ratio, flip)


def affine_jitter_matrix_from_uniforms(u: jax.Array, frame_hw: Sequence[int],
                                       max_rotation_deg: float,
                                       max_translate: float) -> jax.Array:
  """`random_affine_jitter_matrix` as a function of 3 uniforms in [0, 1) instead of a key."""
  chex.assert_shape(u, (JITTER_UNIFORMS,))
  frame_h, frame_w = float(frame_hw[0]), float(frame_hw[1])
  signed = 2.0 * u - 1.0
  angle = signed[0] * math.radians(max_rotation_deg)
  ty = signed[1] * max_translate * frame_h
  tx = signed[2] * max_translate * frame_w
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cy, cx = (frame_h - 1.0) / 2.0, (frame_w - 1.0) / 2.0
  # p_in = R (p - c) + c + t
  off_y = cy + ty - (cos * cy - sin * cx)
  off_x = cx + tx - (sin * cy + cos * cx)
  return jnp.stack([jnp.stack([cos, -sin, off_y]), jnp.stack([sin, cos, off_x])])


def random_affine_jitter_matrix(key: chex.PRNGKey, frame_hw: Sequence[int],
                                max_rotation_deg: float, max_translate: float) -> jax.Array:
  """A small random rotation (about the frame centre) and translation, as a 2x3 matrix.

  The angle is uniform in +-max_rotation_deg; the shift is uniform in
  +-max_translate * side along each axis, both in the pixel frame `frame_hw`. Compose it with
  a crop as `compose_affine(crop, jitter)` to rotate the output grid about its own centre.
  """
  return affine_jitter_matrix_from_uniforms(jax.random.uniform(key, (JITTER_UNIFORMS,)),
                                            frame_hw, max_rotation_deg, max_translate)


# ---- colour spaces -----------------------------------------------------------------------


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """sRGB in [0, 1] (..., 3) -> CIE Lab (D65, 2 degrees), the formulas of skimage.color.rgb2lab.

  L lies in [0, 100]; a in about [-86, 98]; b in about [-108, 95].
  """
  chex.assert_axis_dimension(rgb, -1, 3)
  rgb = jnp.asarray(rgb, jnp.float32)
  # Powers of positive numbers as exp(p * log(x)): on XLA:CPU 2x faster than `**` and 3x
  # faster than cbrt, to within a few float32 ulp (views convert 224x224 images every step).
  linear = jnp.where(rgb > 0.04045,
                     jnp.exp(2.4 * jnp.log((jnp.maximum(rgb, 0.04045) + 0.055) / 1.055)),
                     rgb / 12.92)
  m = _XYZ_FROM_RGB
  xyz = jnp.stack([m[i][0] * linear[..., 0] + m[i][1] * linear[..., 1]
                   + m[i][2] * linear[..., 2] for i in range(3)], axis=-1)
  xyz = xyz / jnp.asarray(_D65_WHITE, jnp.float32)
  f = jnp.where(xyz > 0.008856, jnp.exp(jnp.log(jnp.maximum(xyz, 0.008856)) / 3.0),
                7.787 * xyz + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def normalize_lab(lab: jax.Array) -> jax.Array:
  """(lab - mean) / std, the constants of docs/metaug.md §2.2: each channel to about [-1, 1]."""
  chex.assert_axis_dimension(lab, -1, 3)
  return (lab - jnp.asarray(LAB_MEAN, jnp.float32)) / jnp.asarray(LAB_STD, jnp.float32)


def rgb_to_grey(rgb: jax.Array) -> jax.Array:
  """(..., 3) RGB -> (..., 1) luma with the ITU-R 601 weights (as PIL's convert('L'))."""
  chex.assert_axis_dimension(rgb, -1, 3)
  w = _GREY_WEIGHTS
  return (w[0] * rgb[..., 0] + w[1] * rgb[..., 1] + w[2] * rgb[..., 2])[..., None]


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  delta = maxc - minc
  sat = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  hue = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  hue = jnp.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
  return jnp.stack([hue, sat, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """(..., 3) HSV in [0, 1] -> RGB in [0, 1]; the inverse of `rgb_to_hsv`."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  h6 = (h % 1.0) * 6.0
  sector = jnp.floor(h6)
  frac = h6 - sector
  sector = sector.astype(jnp.int32) % 6
  p = v * (1.0 - s)
  q = v * (1.0 - s * frac)
  t = v * (1.0 - s * (1.0 - frac))
  def pick(*options):
    return jnp.select([sector == i for i in range(6)], list(options))
  return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)],
                   axis=-1)


# ---- colour ops (SimCLR style) -----------------------------------------------------------


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
  """Scales intensities by `factor` (1: unchanged)."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
  """Blends with the image's mean grey level (factor 0: flat grey, 1: unchanged)."""
  grey = rgb_to_grey(image) if image.shape[-1] == 3 else image
  mean = jnp.mean(grey)
  return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """Blends with the per-pixel grey image (factor 0: greyscale, 1: unchanged)."""
  grey = rgb_to_grey(image)
  return jnp.clip((image - grey) * factor + grey, 0.0, 1.0)


def adjust_hue(image: jax.Array, delta) -> jax.Array:
  """Rotates the hue by `delta` turns (delta in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set((hsv[..., 0] + delta) % 1.0)
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


COLOR_JITTER_UNIFORMS = 4  # uniforms consumed by color_jitter_from_uniforms


def color_jitter_from_uniforms(u: jax.Array, image: jax.Array, brightness: float,
                               contrast: float, saturation: float, hue: float) -> jax.Array:
  """`color_jitter` as a function of 4 uniforms in [0, 1) instead of a key."""
  chex.assert_shape(u, (COLOR_JITTER_UNIFORMS,))
  chex.assert_axis_dimension(image, -1, 3)
  def factor(i, x):
    lo = max(0.0, 1.0 - x)
    return lo + (1.0 + x - lo) * u[i]
  image = adjust_brightness(image, factor(0, brightness))
  image = adjust_contrast(image, factor(1, contrast))
  image = adjust_saturation(image, factor(2, saturation))
  return adjust_hue(image, hue * (2.0 * u[3] - 1.0))


def color_jitter(key: chex.PRNGKey, image: jax.Array, brightness: float, contrast: float,
                 saturation: float, hue: float) -> jax.Array:
  """torchvision ColorJitter factors in a fixed order (brightness, contrast, saturation, hue).

  Factors are uniform in [max(0, 1 - x), 1 + x] for the first three, the hue shift uniform in
  [-hue, hue]. `image` must be RGB (H, W, 3).
  """
  return color_jitter_from_uniforms(jax.random.uniform(key, (COLOR_JITTER_UNIFORMS,)), image,
                                    brightness, contrast, saturation, hue)


def simclr_jitter_strengths(strength: float) -> tuple[float, float, float, float]:
  """SimCLR's (brightness, contrast, saturation, hue) for colour-jitter strength s."""
  return (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)


def random_color_jitter(key: chex.PRNGKey, image: jax.Array, strength: float,
                        probability: float = 0.8) -> jax.Array:
  """SimCLR's colour distortion: with `probability`, jitter (0.8s, 0.8s, 0.8s, 0.2s)."""
  u = jax.random.uniform(key, (1 + COLOR_JITTER_UNIFORMS,))
  jittered = color_jitter_from_uniforms(u[1:], image, *simclr_jitter_strengths(strength))
  return jnp.where(u[0] < probability, jittered, image)


def grayscale_rgb(image: jax.Array) -> jax.Array:
  """An RGB image's grey version, kept 3-channel."""
  chex.assert_axis_dimension(image, -1, 3)
  return jnp.broadcast_to(rgb_to_grey(image), image.shape)


def random_grayscale(key: chex.PRNGKey, image: jax.Array, probability: float) -> jax.Array:
  """With `probability`, replaces an RGB image by its grey version (kept 3-channel)."""
  return jnp.where(jax.random.uniform(key, ()) < probability, grayscale_rgb(image), image)


def gaussian_noise(key: chex.PRNGKey, image: jax.Array, std: float) -> jax.Array:
  """Adds i.i.d. N(0, std^2) noise to every pixel (no clipping)."""
  return image + std * jax.random.normal(key, image.shape, image.dtype)


def standardize(image: jax.Array) -> jax.Array:
  """Maps [0, 1] pixel values to [-1, 1]: (x - 0.5) / 0.5."""
  return (image - 0.5) / 0.5
