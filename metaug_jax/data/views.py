"""The views the encoders see (docs/metaug.md §2): batched, jit-able, one PRNG key per example.

View kinds (`data_config.views`):
  * "lab":  one random resized crop (+flip) per image, to normalised Lab, split into the
            L (1 channel), ab (2) and Lab (3) views (docs/metaug.md §2.1-2.2).
  * "lab2": the same crop, only the L and ab views.
  * "augmented_copies": `num_views` independent crops (+flip), small rotation/translation and
            Gaussian noise, standardised to [-1, 1]; the default for grey data.
  * "simclr": `num_views` independent crops (+flip), colour jitter (p=0.8) and random grey,
            standardised to [-1, 1]; colour ops are skipped for 1-channel images.
Eval views have the same channel layout without randomness: the whole image resized to S.
The horizontal flip of every kind is controlled by `data_config.flip`.
"""

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from metaug_jax import config_base
from metaug_jax.data import augment

_LAB_KINDS = ("lab", "lab2")
_SIMCLR_JITTER_PROBABILITY = 0.8  # SimCLR applies colour jitter to 80% of views


class ViewParams(NamedTuple):
  """The plain, hashable view settings read from `data_config` (static under jit)."""
  kind: str
  num_views: int
  input_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  max_rotation_deg: float
  max_translate: float
  noise_std: float
  jitter_strength: float
  grey_probability: float


def view_params(data_config, image_channels: int) -> ViewParams:
  """Validates `data_config` for images with `image_channels` and returns its view settings."""
  kind = data_config.views
  if kind not in config_base.VIEW_KINDS:
    raise ValueError(f"Unknown data.views {kind!r}; allowed values: "
                     f"{', '.join(config_base.VIEW_KINDS)}.")
  if image_channels not in (1, 3):
    raise ValueError(f"Images must have 1 or 3 channels, got {image_channels}.")
  if kind in _LAB_KINDS and image_channels != 3:
    raise ValueError(f"data.views={kind!r} needs colour (RGB) images, but these have "
                     f"{image_channels} channel(s): a grey image has no ab channels. Use "
                     f"--config.data.views=augmented_copies for grey data.")
  count = {"lab": 3, "lab2": 2}.get(kind, int(data_config.num_views))
  if count < 1:
    raise ValueError(f"data.num_views must be >= 1, got {data_config.num_views}.")
  if int(data_config.input_size) < 1:
    raise ValueError(f"data.input_size must be >= 1, got {data_config.input_size}.")
  scale = tuple(float(v) for v in data_config.crop_scale)
  ratio = tuple(float(v) for v in data_config.crop_ratio)
  if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
    raise ValueError(f"data.crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}.")
  if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
    raise ValueError(f"data.crop_ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}.")
  return ViewParams(
      kind=kind, num_views=count, input_size=int(data_config.input_size), crop_scale=scale,
      crop_ratio=ratio, flip=bool(data_config.flip),
      max_rotation_deg=float(data_config.max_rotation_deg),
      max_translate=float(data_config.max_translate), noise_std=float(data_config.noise_std),
      jitter_strength=float(data_config.jitter_strength),
      grey_probability=float(data_config.grey_probability))


def view_channels(data_config, image_channels: int) -> tuple[int, ...]:
  """The channel count each view's encoder takes, in view order."""
  params = view_params(data_config, image_channels)
  if params.kind == "lab":
    return (1, 2, 3)
  if params.kind == "lab2":
    return (1, 2)
  return (image_channels,) * params.num_views


def num_views(data_config) -> int:
  """How many views each example yields."""
  return view_params(data_config, 3).num_views


def _split_lab(kind: str, rgb: jax.Array) -> tuple[jax.Array, ...]:
  """RGB [0, 1] (H, W, 3) -> normalised Lab views: (L, ab, Lab) or (L, ab)."""
  lab = augment.normalize_lab(augment.rgb_to_lab(rgb))
  views = (lab[..., :1], lab[..., 1:])
  return views + (lab,) if kind == "lab" else views


def _crop(u, image, p: ViewParams):
  """Random resized crop (+flip) of one float image to S x S, from CROP_UNIFORMS uniforms."""
  matrix = augment.resized_crop_matrix_from_uniforms(u, image.shape[:2], p.input_size,
                                                     p.crop_scale, p.crop_ratio, flip=p.flip)
  return augment.axis_aligned_sample(image, matrix, p.input_size)


def _augmented_copies(key, image, p: ViewParams):
  """`num_views` copies: crop (+flip), small rotation/translation, Gaussian noise, standardised.

  All randomness of the example comes from two RNG calls (fewer calls compile faster).
  """
  k_uniform, k_noise = jax.random.split(key)
  n_crop, n_jitter = augment.CROP_UNIFORMS, augment.JITTER_UNIFORMS
  u = jax.random.uniform(k_uniform, (p.num_views, n_crop + n_jitter))
  size = p.input_size
  noise = None
  if p.noise_std > 0:
    noise = jax.random.normal(k_noise, (p.num_views, size, size, image.shape[-1]))
  views = []
  for v in range(p.num_views):
    matrix = augment.resized_crop_matrix_from_uniforms(
        u[v, :n_crop], image.shape[:2], size, p.crop_scale, p.crop_ratio, flip=p.flip)
    if p.max_rotation_deg > 0 or p.max_translate > 0:
      jitter = augment.affine_jitter_matrix_from_uniforms(
          u[v, n_crop:], (size, size), p.max_rotation_deg, p.max_translate)
      matrix = augment.compose_affine(matrix, jitter)
    view = augment.affine_sample(image, matrix, size)
    if noise is not None:
      view = view + p.noise_std * noise[v]
    views.append(augment.standardize(view))
  return tuple(views)


def _simclr_copies(key, image, p: ViewParams):
  """`num_views` copies: crop (+flip), colour jitter with p=0.8 and random grey (RGB only)."""
  n_crop, n_jitter = augment.CROP_UNIFORMS, augment.COLOR_JITTER_UNIFORMS
  u = jax.random.uniform(key, (p.num_views, n_crop + n_jitter + 2))
  strengths = augment.simclr_jitter_strengths(p.jitter_strength)
  views = []
  for v in range(p.num_views):
    view = _crop(u[v, :n_crop], image, p)
    if image.shape[-1] == 3:
      jittered = augment.color_jitter_from_uniforms(u[v, n_crop:n_crop + n_jitter], view,
                                                    *strengths)
      view = jnp.where(u[v, -2] < _SIMCLR_JITTER_PROBABILITY, jittered, view)
      view = jnp.where(u[v, -1] < p.grey_probability, augment.grayscale_rgb(view), view)
    views.append(augment.standardize(view))
  return tuple(views)


def _train_views_one(key, image_uint8, p: ViewParams):
  """All views of one uint8 (H, W, C) image from its own key."""
  image = image_uint8.astype(jnp.float32) / 255.0
  if p.kind in _LAB_KINDS:
    u = jax.random.uniform(key, (augment.CROP_UNIFORMS,))
    return _split_lab(p.kind, _crop(u, image, p))
  if p.kind == "augmented_copies":
    return _augmented_copies(key, image, p)
  return _simclr_copies(key, image, p)


@functools.partial(jax.jit, static_argnames="params")
def _train_views(example_keys, images_uint8, params: ViewParams):
  return tuple(jax.vmap(functools.partial(_train_views_one, p=params))(example_keys,
                                                                       images_uint8))


def _eval_views_one(image_uint8, p: ViewParams):
  """Deterministic views of one image: resized whole to S x S, no crop, no jitter."""
  image = image_uint8.astype(jnp.float32) / 255.0
  matrix = augment.resize_matrix(image.shape[:2], p.input_size)
  resized = augment.axis_aligned_sample(image, matrix, p.input_size)
  if p.kind in _LAB_KINDS:
    return _split_lab(p.kind, resized)
  return (augment.standardize(resized),) * p.num_views


@functools.partial(jax.jit, static_argnames="params")
def _eval_views(images_uint8, params: ViewParams):
  return tuple(jax.vmap(functools.partial(_eval_views_one, p=params))(images_uint8))


def _check_batch(images_uint8) -> None:
  chex.assert_rank(images_uint8, 4)
  chex.assert_type(images_uint8, jnp.uint8)


def _typed_keys(keys: jax.Array) -> jax.Array:
  """Typed PRNG keys from typed keys or raw uint32 key data (..., 2)."""
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return keys
  return jax.random.wrap_key_data(keys)


def make_train_views_from_keys(example_keys: jax.Array, images_uint8: jax.Array,
                               data_config) -> tuple[jax.Array, ...]:
  """Random views of a batch with one PRNG key per example (raw (B, 2) or typed (B,) keys).

  Example i's views depend only on (example_keys[i], images_uint8[i]), so they do not depend on
  the batch size or how the batch is split over devices.
  Returns one float32 (B, S, S, C_v) array per view, S = data_config.input_size.
  """
  _check_batch(images_uint8)
  params = view_params(data_config, images_uint8.shape[-1])
  keys = _typed_keys(example_keys)
  chex.assert_shape(keys, (images_uint8.shape[0],))
  return _train_views(keys, images_uint8, params)


def make_train_views(key: chex.PRNGKey, images_uint8: jax.Array,
                     data_config) -> tuple[jax.Array, ...]:
  """Random views of a uint8 (B, H, W, C) batch from one key (split into B per-example keys).

  Returns one float32 (B, S, S, C_v) array per view, S = data_config.input_size.
  """
  _check_batch(images_uint8)
  keys = jax.random.split(_typed_keys(key), images_uint8.shape[0])
  return make_train_views_from_keys(keys, images_uint8, data_config)


def make_eval_views(images_uint8: jax.Array, data_config) -> tuple[jax.Array, ...]:
  """Deterministic views of a uint8 (B, H, W, C) batch with the train views' channel layout.

  Returns one float32 (B, S, S, C_v) array per view, S = data_config.input_size.
  """
  _check_batch(images_uint8)
  return _eval_views(images_uint8, view_params(data_config, images_uint8.shape[-1]))
