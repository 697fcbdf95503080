"""A seeded subset of a data set's training images (`config.data.max_train_examples`).

Pre-training and the linear probe's training set shrink together, so that a CPU run can use,
say, 10k of Fashion-MNIST's 60k images; the test set is kept whole, so accuracies stay
comparable across subset sizes.
"""

import dataclasses
import logging

import numpy as np

from metaug_jax.data import dataset as sources


def _draw(num: int, keep: int, rng: np.random.Generator) -> np.ndarray:
  """`keep` of range(num) without replacement, in increasing order."""
  return np.sort(rng.choice(num, size=keep, replace=False))


def limit_train_examples(dataset: sources.ImageDataset, max_examples: int,
                         seed: int) -> sources.ImageDataset:
  """`dataset` with at most `max_examples` pre-training and probe-training images (0: all).

  A uniform draw seeded by `seed` (data.split_seed). Where the probe's training images are the
  pre-training images (every loader but STL-10's train+unlabelled), the same rows are kept for
  both.
  """
  max_examples = int(max_examples)
  if max_examples < 0:
    raise ValueError(f"data.max_train_examples must be >= 0 (0: all), got {max_examples}.")
  n_pre, n_train = len(dataset.pretrain_images), len(dataset.train_images)
  if max_examples == 0 or max(n_pre, n_train) <= max_examples:
    return dataset
  rng = np.random.default_rng(seed)
  shared = dataset.pretrain_images is dataset.train_images
  pre_idx = _draw(n_pre, min(n_pre, max_examples), rng)
  train_idx = pre_idx if shared else _draw(n_train, min(n_train, max_examples), rng)
  pretrain = dataset.pretrain_images[pre_idx]
  train = pretrain if shared else dataset.train_images[train_idx]
  labels = None if dataset.train_labels is None else dataset.train_labels[train_idx]
  logging.info("%s: using %d of %d pre-training images (data.max_train_examples).",
               dataset.name, len(pre_idx), n_pre)
  return dataclasses.replace(dataset, pretrain_images=pretrain, train_images=train,
                             train_labels=labels)
