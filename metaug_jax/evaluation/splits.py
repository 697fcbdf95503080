"""Seeded, stratified label subsets of a probe's training set (numpy only).

* `few_label_subset`: the labelled examples of a few-label probe, a fixed fraction of every
  class (at least one example each): the class-balanced 1 % and 10 % label fractions of the
  semi-supervised comparison of Chen et al. 2020 (SimCLR, §6, Table 7), here for a linear probe.
* `validation_split`: a validation set carved from the training set, per class, that selects
  a probe's epoch (and learning rate / weight decay) so that the test set never selects
  anything.

Every draw is a function of (seed, purpose, fraction, draw) alone, so methods compared with the
same seed see the same labels.
"""

import numpy as np

_FEW_LABEL = 1    # purpose tags in the seed sequences: the two kinds of draws never coincide
_VALIDATION = 2


def _per_class(labels: np.ndarray) -> list:
  """[(class, its example indices in order)] over the classes present."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
  return [(c, np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _count(fraction: float, n: int) -> int:
  """round(fraction * n), halves rounded up."""
  return int(np.floor(fraction * n + 0.5))


def few_label_subset(labels: np.ndarray, fraction: float, seed: int, draw: int) -> np.ndarray:
  """Sorted indices of `fraction` of each class's examples (at least 1, at most all of them),
  drawn without replacement; draw `draw` of seed `seed`."""
  if not 0 < fraction <= 1:
    raise ValueError(f"a label fraction must be in (0, 1], got {fraction}")
  rng = np.random.default_rng([int(seed), _FEW_LABEL, int(round(fraction * 1e6)), int(draw)])
  picked = [rng.choice(idx, size=min(len(idx), max(1, _count(fraction, len(idx)))),
                       replace=False) for _, idx in _per_class(labels)]
  return np.sort(np.concatenate(picked))


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple:
  """(fit indices, validation indices), both sorted: `fraction` of each class (rounded, and
  leaving at least one example of the class to fit on) goes to validation.

  Raises ValueError if no class has enough examples for a validation example.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"a validation fraction must be in (0, 1), got {fraction}")
  rng = np.random.default_rng([int(seed), _VALIDATION])
  fit, val = [], []
  for _, idx in _per_class(labels):
    order = rng.permutation(idx)
    k = min(len(idx) - 1, _count(fraction, len(idx)))
    val.append(order[:k])
    fit.append(order[k:])
  val = np.sort(np.concatenate(val))
  if val.size == 0:
    raise ValueError(f"a validation fraction of {fraction} leaves no validation example in "
                     f"{len(labels)} training examples; raise config.eval.val_fraction or set "
                     f"it to 0 (no validation-selected probe)")
  return np.sort(np.concatenate(fit)), val
