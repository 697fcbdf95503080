"""Add-one augmentation pipelines of hierarchical augmentation invariance (Zhang & Ma, CVPR
2022, Fig. 3a; docs/hierarchical_augmentation.md): one view pair per encoder exit, plus
each view's colour-jitter parameters for the expanded views.

Exit s's views get crop + colour jitter, then the ops whose first exit is <= s (released
order: grayscale from exit 2, Gaussian blur from 3, horizontal flip from 4; rotation by a
multiple of 90 degrees optional). Two diagnostic schedules use the same pipeline:
"uniform" (every exit gets every enabled op) and "strength" (every exit gets every enabled
op, weaker the shallower the exit). Everything is on device, per example, from explicit keys.

Grey (1-channel) images: the jitter applies brightness and contrast only and records
saturation 1 and hue 0 (their identity values); grayscale is the identity.
"""

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from metaug_jax import parallel
from metaug_jax.data import augment

SCHEDULES = ("add_one", "uniform", "strength")
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)   # [brightness, contrast, saturation, hue], skipped
# Uniforms per view: crop (5), jitter gate + 4 factors, grey, blur gate + sigma, flip,
# rotation gate + quarter turns.
_CROP = slice(0, augment.CROP_UNIFORMS)
_JITTER_GATE, _JITTER = 5, slice(6, 10)
_GREY, _BLUR_GATE, _BLUR_SIGMA, _FLIP, _ROT_GATE, _ROT_TURNS = 10, 11, 12, 13, 14, 15
UNIFORMS = 16
BLUR_SIGMA = (0.1, 2.0)                  # GaussianBlur's sigma range (SimCLR / the code)
# "strength" schedule, per level shallower than the deepest exit (the paper's supplement):
_STRENGTH_PROBABILITY_STEP = 0.05        # flip / grayscale / blur (/ rotation) probability
_STRENGTH_JITTER_STEP = 0.02             # each colour-jitter factor
_STRENGTH_CROP_STEP = 0.1                # the crop's minimum scale rises


class StageOps(NamedTuple):
  """The ops one exit's views get and their strengths (probability 0: the op is absent)."""
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  jitter: tuple[float, float, float, float]   # ColorJitter(brightness, contrast, sat., hue)
  jitter_probability: float
  grey_probability: float
  blur_probability: float
  blur_kernel: int                             # odd side of the blur kernel
  flip_probability: float
  rotation_probability: float


class PipelineSpec(NamedTuple):
  """Static settings of the pipelines (hashable: a jit static argument)."""
  exits: tuple[int, ...]          # the exit each view pair is for, shallow to deep
  deepest_exit: int               # the encoder's last exit (the classical pipeline's level)
  schedule: str
  input_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  jitter: tuple[float, float, float, float]
  jitter_probability: float
  grey_probability: float
  blur_probability: float
  flip_probability: float
  rotation_probability: float
  grayscale_from: int             # first exit with the op; 0: never
  blur_from: int
  flip_from: int
  rotation_from: int


def blur_kernel_size(input_size: int) -> int:
  """The released code's kernel side size // 20 * 2 + 1 (23 at 224 px); 0 (no blur) at <= 32
  px, where the code switches blur off."""
  return 0 if input_size <= 32 else input_size // 20 * 2 + 1


def pipeline_spec(hai_config, data_config, deepest_exit: int) -> PipelineSpec:
  """The pipelines' settings from the config's `hai` and `data` sections."""
  exits = tuple(int(e) for e in hai_config.exits)
  if not exits or list(exits) != sorted(set(exits)) or exits[0] < 1 \
      or exits[-1] > deepest_exit:
    raise ValueError(f"hai.exits must be increasing exits in 1..{deepest_exit}, got {exits}")
  if hai_config.schedule not in SCHEDULES:
    raise ValueError(f"hai.schedule must be one of {SCHEDULES}, got {hai_config.schedule!r}")
  return PipelineSpec(
      exits=exits, deepest_exit=int(deepest_exit), schedule=str(hai_config.schedule),
      input_size=int(data_config.input_size),
      crop_scale=tuple(float(v) for v in data_config.crop_scale),
      crop_ratio=tuple(float(v) for v in data_config.crop_ratio),
      jitter=tuple(float(v) for v in hai_config.jitter),
      jitter_probability=float(hai_config.jitter_probability),
      grey_probability=float(hai_config.grey_probability),
      blur_probability=float(hai_config.blur_probability),
      flip_probability=float(hai_config.flip_probability),
      rotation_probability=float(hai_config.rotation_probability),
      grayscale_from=int(hai_config.grayscale_from), blur_from=int(hai_config.blur_from),
      flip_from=int(hai_config.flip_from), rotation_from=int(hai_config.rotation_from))


def stage_ops(spec: PipelineSpec, exit_: int) -> StageOps:
  """The ops of exit `exit_`'s views under the spec's schedule (Fig. 3a and the supplement's
  diagnostic baselines)."""
  def enabled(first: int) -> bool:
    if first <= 0:
      return False
    return first <= exit_ if spec.schedule == "add_one" else True

  levels = spec.deepest_exit - exit_ if spec.schedule == "strength" else 0
  def probability(first: int, p: float) -> float:
    return max(0.0, p - _STRENGTH_PROBABILITY_STEP * levels) if enabled(first) else 0.0

  jitter = tuple(max(0.0, j - _STRENGTH_JITTER_STEP * levels) for j in spec.jitter)
  lo = min(spec.crop_scale[1], spec.crop_scale[0] + _STRENGTH_CROP_STEP * levels)
  kernel = blur_kernel_size(spec.input_size)
  return StageOps(
      crop_scale=(lo, spec.crop_scale[1]), crop_ratio=spec.crop_ratio, jitter=jitter,
      jitter_probability=spec.jitter_probability,
      grey_probability=probability(spec.grayscale_from, spec.grey_probability),
      blur_probability=probability(spec.blur_from, spec.blur_probability) if kernel else 0.0,
      blur_kernel=kernel,
      flip_probability=probability(spec.flip_from, spec.flip_probability),
      rotation_probability=probability(spec.rotation_from, spec.rotation_probability))


# ---- single ops the other view kinds do not have -------------------------------------------


def gaussian_blur(image: jax.Array, sigma, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of one (H, W, C) image, reflect-padded (torchvision's
  GaussianBlur): weights exp(-x^2 / 2 sigma^2) over x in [-k//2, k//2], normalised."""
  chex.assert_rank(image, 3)
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"blur kernel size must be odd and >= 1, got {kernel_size}")
  half = kernel_size // 2
  if half >= min(image.shape[:2]):
    raise ValueError(f"blur kernel {kernel_size} too large for a {image.shape[:2]} image")
  x = jnp.arange(-half, half + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  w = w / jnp.sum(w)
  padded = jnp.pad(image, ((half, half), (half, half), (0, 0)), mode="reflect")
  h, wd = image.shape[:2]
  rows = sum(w[i] * padded[i:i + h] for i in range(kernel_size))
  return sum(w[i] * rows[:, i:i + wd] for i in range(kernel_size))


def rotate_quarter_turns(image: jax.Array, turns) -> jax.Array:
  """Rotates a square (S, S, C) image by `turns` (traced int in 0..3) quarter turns."""
  options = [jnp.rot90(image, k, axes=(0, 1)) for k in range(4)]
  return jnp.select([turns == k for k in range(4)], options)


def jitter_factors(u: jax.Array, jitter) -> jax.Array:
  """[brightness, contrast, saturation, hue] of ColorJitter(*jitter) from 4 uniforms: factors
  uniform in [max(0, 1 - x), 1 + x], hue shift uniform in [-h, h] (as
  `augment.color_jitter_from_uniforms`)."""
  chex.assert_shape(u, (4,))
  out = []
  for i, x in enumerate(jitter[:3]):
    lo = max(0.0, 1.0 - x)
    out.append(lo + (1.0 + x - lo) * u[i])
  out.append(jitter[3] * (2.0 * u[3] - 1.0))
  return jnp.stack(out)


def apply_jitter(image: jax.Array, factors: jax.Array) -> jax.Array:
  """Brightness, contrast, saturation, hue in that fixed order; on a grey image only the first
  two (saturation and hue do not exist there)."""
  image = augment.adjust_brightness(image, factors[0])
  image = augment.adjust_contrast(image, factors[1])
  if image.shape[-1] == 3:
    image = augment.adjust_saturation(image, factors[2])
    image = augment.adjust_hue(image, factors[3])
  return image


# ---- one view, one example, a batch -------------------------------------------------------


def view_from_uniforms(u: jax.Array, image: jax.Array, ops: StageOps, size: int):
  """One float [0, 1] (H, W, C) image -> (view standardised to [-1, 1] (size, size, C),
  its colour-jitter parameters (4,)), the stage's ops in order crop (+flip) -> colour jitter
  -> blur -> grayscale -> rotation, all randomness from `u` (UNIFORMS,)."""
  chex.assert_shape(u, (UNIFORMS,))
  crop_u = u[_CROP]
  if ops.flip_probability > 0:   # the crop's flip bit fires iff u[flip] < p
    crop_u = crop_u.at[4].set(jnp.where(u[_FLIP] < ops.flip_probability, 0.0, 1.0))
  matrix = augment.resized_crop_matrix_from_uniforms(
      crop_u, image.shape[:2], size, ops.crop_scale, ops.crop_ratio,
      flip=ops.flip_probability > 0)
  view = augment.axis_aligned_sample(image, matrix, size)
  grey = image.shape[-1] == 1
  factors = jitter_factors(u[_JITTER], ops.jitter)
  if grey:   # the recorded saturation / hue are their identity values
    factors = factors.at[2].set(1.0).at[3].set(0.0)
  jittered = u[_JITTER_GATE] < ops.jitter_probability
  view = jnp.where(jittered, apply_jitter(view, factors), view)
  params = jnp.where(jittered, factors, jnp.asarray(IDENTITY_JITTER, jnp.float32))
  if ops.blur_probability > 0:
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[_BLUR_SIGMA]
    view = jnp.where(u[_BLUR_GATE] < ops.blur_probability,
                     gaussian_blur(view, sigma, ops.blur_kernel), view)
  if ops.grey_probability > 0 and not grey:
    view = jnp.where(u[_GREY] < ops.grey_probability, augment.grayscale_rgb(view), view)
  if ops.rotation_probability > 0:
    turns = jnp.where(u[_ROT_GATE] < ops.rotation_probability,
                      jnp.floor(4.0 * u[_ROT_TURNS]).astype(jnp.int32), 0)
    view = rotate_quarter_turns(view, jnp.clip(turns, 0, 3))
  return augment.standardize(view), params


def _example_views(key, image_uint8, spec: PipelineSpec):
  """All exits' view pairs of one uint8 image: ((v1, v2, a1, a2) per exit)."""
  image = image_uint8.astype(jnp.float32) / 255.0
  u = jax.random.uniform(key, (len(spec.exits), 2, UNIFORMS))
  out = []
  for i, exit_ in enumerate(spec.exits):
    ops = stage_ops(spec, exit_)
    (v1, a1), (v2, a2) = (view_from_uniforms(u[i, j], image, ops, spec.input_size)
                          for j in range(2))
    out.append((v1, v2, a1, a2))
  return tuple(out)


@functools.partial(jax.jit, static_argnames="spec")
def _batch_views(keys, images_uint8, spec: PipelineSpec):
  return jax.vmap(functools.partial(_example_views, spec=spec))(keys, images_uint8)


def hierarchical_views_from_keys(example_keys: jax.Array, images_uint8: jax.Array,
                                 spec: PipelineSpec) -> tuple:
  """One (v1, v2, a1, a2) per exit of `spec.exits`: views (B, S, S, C) in [-1, 1] and their
  colour-jitter parameters (B, 4). Example i depends only on example_keys[i] and its image."""
  chex.assert_rank(images_uint8, 4)
  chex.assert_type(images_uint8, jnp.uint8)
  if images_uint8.shape[1] != images_uint8.shape[2]:
    raise ValueError(f"hierarchical views need square images, got {images_uint8.shape}")
  chex.assert_axis_dimension(example_keys, 0, images_uint8.shape[0])
  out = _batch_views(example_keys, images_uint8, spec)
  b = images_uint8.shape[0]
  for v1, v2, a1, a2 in out:
    chex.assert_shape([v1, v2], (b, spec.input_size, spec.input_size, images_uint8.shape[-1]))
    chex.assert_shape([a1, a2], (b, 4))
  return out


def hierarchical_views(images_uint8: jax.Array, key: jax.Array, spec: PipelineSpec) -> tuple:
  """`hierarchical_views_from_keys` for this device's batch, keyed by each example's global
  position (the same views however the batch is split over devices; call inside pmap)."""
  keys = parallel.example_keys(key, images_uint8.shape[0])
  return hierarchical_views_from_keys(keys, images_uint8, spec)

