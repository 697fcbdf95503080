"""The one feature-extraction path (docs/implementation.md §9.1): a frozen encoder's features of
uint8 images, mapped over the local devices.

The linear probe, the kNN, the online monitor, the 2-D embedding plot and the eval CLI all
extract through an `Extractor`. Images go through the deterministic eval views, or through the
training views drawn from one key per example (so an example's views depend on its key alone,
not on the batch size or the device count). Batches have one fixed global size, the last one
padded by repeating its final image, so each kind of views compiles once; the parameters are
arguments of the mapped function (never baked-in constants), so new parameters reuse it.

The mapping is `jax.pmap` over the given local devices with axis `parallel.AXIS`
(docs/implementation.md §2), each device taking an equal share of a batch. Across processes a
pmap would span every process's devices, so there each process extracts on its first local
device alone, under `vmap` with the same axis name.
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metaug_jax import parallel
from metaug_jax.data import views as views_lib

# fn(params, batch_stats, views) -> {name: (B, ...) array}; runs with parallel.AXIS bound, so a
# feature function may use collectives over the batch (train-mode BatchNorm then normalises
# with the statistics of the whole, padded batch).
FeatureFn = Callable[[dict, dict, tuple], dict]


def example_keys(key: jax.Array, n: int) -> np.ndarray:
  """Raw (n, 2) uint32 keys, example i's = fold_in(key, i): the views of the training
  augmentation that `Extractor(..., keys=...)` draws."""
  fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
  keys = fold(key, jnp.arange(n, dtype=jnp.uint32))
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)
  return np.asarray(keys)


def _raw_keys(keys) -> np.ndarray:
  """Typed keys or raw key data as a host uint32 (N, 2) array."""
  if jnp.issubdtype(jnp.asarray(keys).dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)
  return np.asarray(keys)


class Extractor:
  """fn(params, batch_stats, images, keys=None) -> {name: float32 (N, ...) numpy}.

  Build once per feature function and reuse: the mapped functions are compiled on first use
  (one for eval views, one for keyed training views) and reused for any parameters.
  """

  def __init__(self, feature_fn: FeatureFn, data_config, batch_size: int,
               devices: Optional[Sequence] = None, names: Optional[Sequence[str]] = None):
    """
    Args:
      feature_fn: the features of a batch of views (a method's `features`, or any FeatureFn).
      data_config: config.data, for the views.
      batch_size: images per mapped call, rounded up to a multiple of the devices.
      devices: local devices to map over (default: all local devices).
      names: keep only these outputs of feature_fn (None: all of them); names it lacks are
        left out.
    """
    self.several_processes = jax.process_count() > 1
    devices = list(devices) if devices else parallel.local_devices()
    self.devices = devices[:1] if self.several_processes else devices
    n = len(self.devices)
    self.per_device = -(-int(batch_size) // n)
    self.batch_size = self.per_device * n
    keep = None if names is None else tuple(names)

    def select(out: dict) -> dict:
      return {k: v.astype(jnp.float32) for k, v in out.items() if keep is None or k in keep}

    def eval_features(params, stats, images):
      return select(feature_fn(params, stats, views_lib.make_eval_views(images, data_config)))

    def train_features(params, stats, images, keys):
      views = views_lib.make_train_views_from_keys(keys, images, data_config)
      return select(feature_fn(params, stats, views))

    self._eval = self._map(eval_features, 1)
    self._train = self._map(train_features, 2)

  def _map(self, fn: Callable, batch_args: int) -> Callable:
    """fn(params, stats, *batch arrays) mapped over the devices: batch arrays carry a leading
    device axis, params and stats are shared."""
    in_axes = (None, None) + (0,) * batch_args
    if self.several_processes:
      return jax.jit(jax.vmap(fn, in_axes=in_axes, axis_name=parallel.AXIS))
    return jax.pmap(fn, axis_name=parallel.AXIS, in_axes=in_axes, devices=self.devices)

  def _place(self, tree):
    """The parameters, copied once per call to every device (replicated)."""
    if self.several_processes:
      return jax.device_put(tree, self.devices[0])
    mesh = jax.sharding.Mesh(np.asarray(self.devices), (parallel.AXIS,))
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def __call__(self, params, batch_stats, images: np.ndarray, keys=None) -> dict:
    """Features of uint8 (N, H, W, C) `images`: eval views, or with `keys` (N typed keys or
    raw (N, 2) key data) the training views drawn from example i's key."""
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
      raise ValueError("no images to extract features from")
    batch = [images]
    if keys is not None:
      keys = _raw_keys(keys)
      if keys.shape[0] != n:
        raise ValueError(f"{keys.shape[0]} keys for {n} images")
      batch.append(keys)
    fn = self._train if keys is not None else self._eval
    shared = self._place((params, batch_stats))
    size, devices = self.batch_size, len(self.devices)
    chunks, pending = [], None
    for start in range(0, n, size):
      parts = [a[start:start + size] for a in batch]
      keep = parts[0].shape[0]
      if keep < size:  # one compiled shape: pad by repeating the last row
        parts = [np.concatenate([p, np.repeat(p[-1:], size - keep, axis=0)]) for p in parts]
      out = fn(*shared, *(p.reshape(devices, self.per_device, *p.shape[1:]) for p in parts))
      if pending is not None:  # fetch the previous batch while this one runs
        chunks.append(_fetch(*pending))
      pending = (out, keep)
    chunks.append(_fetch(*pending))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _fetch(out: dict, keep: int) -> dict:
  """Host copies of one mapped batch's outputs, devices merged, padding dropped."""
  out = jax.device_get(out)
  return {k: np.asarray(v).reshape(-1, *v.shape[2:])[:keep] for k, v in out.items()}


def method_extractor(method, data_config, batch_size: int, devices: Optional[Sequence] = None,
                     names: Optional[Sequence[str]] = None) -> Extractor:
  """An Extractor of `method.features` (BatchNorm in eval mode; docs/adding_a_method.md)."""
  return Extractor(method.features, data_config, batch_size, devices, names)


def split_views(features: np.ndarray, num_views: int) -> np.ndarray:
  """(N, V*D) view-concatenated features -> (V, N, D), view v's block."""
  if features.shape[-1] % num_views:
    raise ValueError(f"features of width {features.shape[-1]} do not split into {num_views} "
                     f"views")
  return np.stack(np.split(features, num_views, axis=-1))


def pixel_features(images: np.ndarray) -> np.ndarray:
  """Raw pixels as features: uint8 (N, H, W, C) -> float32 (N, H*W*C) in [0, 1] (the probes
  standardise them as they do any level)."""
  images = np.asarray(images)
  return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
