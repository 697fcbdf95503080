"""Colour-prediction probe (Zhang & Ma, CVPR 2022, supplement; docs/hierarchical_augmentation.md
§8): how much colour information a frozen encoder's features keep, for any method.

Each probe image gets two colour-jittered copies at strengths t1, t2 in [-1, 1]. Strength t
sets brightness, contrast and saturation to 1 + t j_b, 1 + t j_c, 1 + t j_s and shifts the hue
by t j_h, with (j_b, j_c, j_s, j_h) = JITTER, the released ColorJitter(0.4, 0.4, 0.4, 0.1) for
every method so that their numbers compare. That is the diagonal of the jitter's range, so
what separates the two copies is a function of their strengths alone. The label is the bin of
the relative strength difference d = (t2 - t1) / 2 in [-1, 1], split into 10 equal bins; bins
are drawn uniformly (chance: 10%) and the pair's mean strength at random, so one copy's
strength is not a function of the label. The input is the copies' features concatenated, [f(x1) || f(x2)], at
each probe level (eval views, BatchNorm in eval mode); a linear softmax classifier
(`linear_probe.probe`, with the class probe's settings) predicts the bin. A colour-invariant
feature, f(x1) = f(x2), scores chance.

Grey (1-channel) data have no saturation or hue: the probe does not apply there and says so.
"""

import functools
import json
import os
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metaug_jax.data import hierarchical
from metaug_jax.evaluation import features as features_lib
from metaug_jax.evaluation import linear_probe, tables

NUM_BINS = 10
JITTER = (0.4, 0.4, 0.4, 0.1)   # (brightness, contrast, saturation, hue) ranges at |t| = 1
_TRAIN_STREAM, _TEST_STREAM = 0, 1   # fold_in tags of the two splits' keys


def difference_bins(t1: jax.Array, t2: jax.Array, num_bins: int = NUM_BINS) -> jax.Array:
  """The label of each pair: the bin of d = (t2 - t1) / 2 in [-1, 1], `num_bins` equal bins
  (d = 1 falls in the last)."""
  d = (t2 - t1) / 2.0
  return jnp.clip(jnp.floor((d + 1.0) / 2.0 * num_bins), 0, num_bins - 1).astype(jnp.int32)


def sample_strengths(key: jax.Array, num_bins: int = NUM_BINS) -> tuple:
  """One pair's strengths (t1, t2) and label: the bin uniform, d uniform within it, the mean
  strength m uniform in [-(1 - |d|), 1 - |d|] so that t1 = m - d and t2 = m + d stay in
  [-1, 1]."""
  bin_key, within_key, mean_key = jax.random.split(key, 3)
  label = jax.random.randint(bin_key, (), 0, num_bins)
  d = -1.0 + (label + jax.random.uniform(within_key)) * 2.0 / num_bins
  m = (2.0 * jax.random.uniform(mean_key) - 1.0) * (1.0 - jnp.abs(d))
  t1, t2 = jnp.clip(m - d, -1.0, 1.0), jnp.clip(m + d, -1.0, 1.0)
  return t1, t2, difference_bins(t1, t2, num_bins)


def strength_factors(t: jax.Array, jitter) -> jax.Array:
  """[brightness, contrast, saturation, hue] of strength t on the jitter's diagonal."""
  b, c, s, h = jitter
  return jnp.stack([jnp.maximum(0.0, 1.0 + t * b), jnp.maximum(0.0, 1.0 + t * c),
                    jnp.maximum(0.0, 1.0 + t * s), t * h])


def jitter_at_strength(image: jax.Array, t: jax.Array, jitter) -> jax.Array:
  """An RGB [0, 1] (H, W, 3) image jittered at strength t (ops in the pipelines' fixed order:
  brightness, contrast, saturation, hue)."""
  chex.assert_axis_dimension(image, -1, 3)
  return hierarchical.apply_jitter(image, strength_factors(t, jitter))


def _to_uint8(image: jax.Array) -> jax.Array:
  return jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("jitter", "num_bins"))
def _pairs(keys, images_uint8, jitter, num_bins):
  def one(key, image):
    t1, t2, label = sample_strengths(key, num_bins)
    x = image.astype(jnp.float32) / 255.0
    return (_to_uint8(jitter_at_strength(x, t1, jitter)),
            _to_uint8(jitter_at_strength(x, t2, jitter)), label)
  return jax.vmap(one)(keys, images_uint8)


def jittered_pairs(key: jax.Array, images_uint8: np.ndarray, jitter=JITTER,
                   num_bins: int = NUM_BINS, chunk: int = 1024) -> tuple:
  """(x1, x2, labels) of RGB uint8 (N, H, W, 3) images: both copies uint8, labels (N,) int32;
  example i depends only on fold_in(key, i) and its image (chunks of `chunk` on device)."""
  chex.assert_rank(images_uint8, 4)
  chex.assert_axis_dimension(images_uint8, -1, 3)
  jitter = tuple(float(j) for j in jitter)
  out = []
  for start in range(0, images_uint8.shape[0], chunk):
    batch = images_uint8[start:start + chunk]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(start, start + batch.shape[0]))
    out.append(jax.device_get(_pairs(keys, jnp.asarray(batch), jitter, num_bins)))
  return tuple(np.concatenate([o[i] for o in out]) for i in range(3))


def not_applicable(dataset) -> Optional[str]:
  """Why the probe cannot run on `dataset` (None if it can)."""
  if dataset.channels != 3:
    return (f"{dataset.name} has {dataset.channels}-channel (grey) images, which have no "
            f"saturation or hue to jitter")
  return None


def _split(dataset, seed: int, max_examples: int) -> tuple:
  """(train, test) uint8 images: the data set's train / test images (without a test set, a
  seeded fifth of the train images is held out), each a seeded subset of <= max_examples
  (0: all)."""
  rng = np.random.default_rng(seed)
  train = dataset.train_images if dataset.train_images is not None \
      else dataset.pretrain_images
  test = dataset.test_images
  if test is None:
    order = rng.permutation(train.shape[0])
    held = max(1, train.shape[0] // 5)
    train, test = train[order[held:]], train[order[:held]]
  def subset(images):
    if max_examples and images.shape[0] > max_examples:
      return images[np.sort(rng.choice(images.shape[0], max_examples, replace=False))]
    return images
  return subset(train), subset(test)


def evaluate(method, params, batch_stats, dataset, config, seed: Optional[int] = None) -> dict:
  """{level: {test_acc, best_test_acc, train_acc, dim, chance}} of the colour probe on every
  probe level the method exposes (accuracies in percent; chance = the test split's most
  frequent bin)."""
  reason = not_applicable(dataset)
  if reason:
    raise ValueError(f"the colour probe does not apply: {reason}")
  ec = config.eval
  seed = config.seed if seed is None else seed
  key = jax.random.PRNGKey(seed)
  extractor = features_lib.method_extractor(method, config.data, ec.batch_size,
                                            names=linear_probe.LEVELS)
  extract = functools.partial(extractor, params, batch_stats)
  splits = []
  for stream, images in zip((_TRAIN_STREAM, _TEST_STREAM),
                            _split(dataset, seed, int(ec.colour_probe_examples))):
    x1, x2, labels = jittered_pairs(jax.random.fold_in(key, stream), images)
    f1, f2 = extract(x1), extract(x2)
    splits.append(({k: np.concatenate([f1[k], f2[k]], axis=-1) for k in f1}, labels))
  (train, train_y), (test, test_y) = splits
  chance = float(np.bincount(test_y, minlength=NUM_BINS).max() / test_y.shape[0] * 100)
  results = {}
  for level in train:
    r = linear_probe.probe(train[level], train_y, test[level], test_y, NUM_BINS,
                           epochs=ec.probe_epochs, lr=ec.probe_lr,
                           batch_size=ec.probe_batch_size,
                           weight_decay=ec.probe_weight_decay, seed=seed)
    results[level] = {**r, "chance": chance}
  return results


def format_table(results: dict, title: str) -> str:
  """A markdown table: one row per level, the chance level beside."""
  head = ["features", "dim (2 copies)", "test acc (final)", "test acc (best epoch)",
          "train acc", "chance"]
  rows = [[level, r["dim"], *(tables.number(r[k]) for k in ("test_acc", "best_test_acc",
                                                               "train_acc", "chance"))]
          for level, r in results.items()]
  return tables.markdown_table(head, rows, title)


def run_if_enabled(exp, state, workdir: Optional[str] = None) -> Optional[dict]:
  """With config.eval.colour_probe: the probe of `state`'s frozen encoder, printed as a table
  and written to workdir/colour_probe_step_<step>.json (colour_probe_random_init.json for
  eval.random_init); one printed line and None where it does not apply; None when off."""
  config = exp.config
  if not config.eval.colour_probe:
    return None
  reason = not_applicable(exp.dataset)
  if reason:
    print(f"colour probe: does not apply: {reason}.", flush=True)
    return None
  params, stats = jax.device_get((state.params, state.batch_stats))
  results = evaluate(exp.method, params, stats, exp.dataset, config)
  step = int(state.step)
  print(format_table(results, f"colour probe: {NUM_BINS}-bin jitter-strength difference "
                              f"of two copies ({config.dataset}, {config.method}, step "
                              f"{step})"), flush=True)
  if workdir and jax.process_index() == 0:
    name = ("colour_probe_random_init.json" if config.eval.random_init
            else f"colour_probe_step_{step}.json")
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(results, f, indent=2)
  return results
