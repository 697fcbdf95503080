"""The in-memory dataset every loader returns, its errors, and the helpers loaders share.

Loaders (one module each under metaug_jax/data/) import from here; `sources.load_dataset`
dispatches to them.
"""

import dataclasses
import math
from typing import Optional

import numpy as np


class DatasetUnavailableError(RuntimeError):
  """The dataset is not on disk (or not readable here); the message says what to do."""


class DataError(ValueError):
  """The user's data cannot be used as it is: a one-line message naming the file and the fix."""


def one_line(text) -> str:
  """`text` with its whitespace runs (newlines included) collapsed: messages stay one line."""
  return " ".join(str(text).split())


@dataclasses.dataclass(frozen=True, eq=False)


class ImageDataset:
  """A dataset held in host memory: uint8 (N, H, W, C) images, C in {1, 3}, int32 labels."""
  name: str
  pretrain_images: np.ndarray
  train_images: np.ndarray
  train_labels: Optional[np.ndarray]
  test_images: Optional[np.ndarray]
  test_labels: Optional[np.ndarray]
  num_classes: Optional[int]

  def __post_init__(self):
    _check_images(self.pretrain_images, "pretrain_images")
    _check_images(self.train_images, "train_images")
    shape = self.pretrain_images.shape[1:]
    if self.train_images.shape[1:] != shape:
      raise DataError(f"{self.name}: train_images are {self.train_images.shape[1:]}, "
                      f"pretrain_images {shape}; they must have the same H, W, C.")
    _check_labels(self.train_labels, self.train_images, "train", self.num_classes)
    if self.test_images is not None:
      _check_images(self.test_images, "test_images")
      if self.test_images.shape[1:] != shape:
        raise DataError(f"{self.name}: test_images are {self.test_images.shape[1:]}, "
                        f"train images {shape}; they must have the same H, W, C.")
      _check_labels(self.test_labels, self.test_images, "test", self.num_classes)
    elif self.test_labels is not None:
      raise DataError(f"{self.name}: test_labels given without test_images.")

  @property
  def channels(self) -> int:
    """Image channels: 1 (grey) or 3 (RGB)."""
    return int(self.pretrain_images.shape[-1])

  @property
  def image_size(self) -> tuple[int, int]:
    """(height, width) of every image."""
    return int(self.pretrain_images.shape[1]), int(self.pretrain_images.shape[2])

  @property
  def has_labels(self) -> bool:
    """Whether the probe's training set is labelled (a linear probe is possible)."""
    return self.train_labels is not None

  @property
  def has_test_set(self) -> bool:
    """Whether a labelled held-out set exists."""
    return self.test_images is not None and self.test_labels is not None


def _check_images(images, what: str) -> None:
  """Raises DataError unless `images` is a non-empty uint8 (N, H, W, C) array with C in {1, 3}."""
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
    raise DataError(f"{what} must be a uint8 numpy array, got "
                    f"{type(images).__name__} {getattr(images, 'dtype', '')}.")
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise DataError(f"{what} must have shape (N>0, H, W, C) with C in (1, 3), "
                    f"got {images.shape}.")


def _check_labels(labels, images, what: str, num_classes: Optional[int]) -> None:
  """Raises DataError unless labels are None or int32 (N,) in [0, num_classes)."""
  if labels is None:
    return
  if labels.dtype != np.int32 or labels.shape != (images.shape[0],):
    raise DataError(f"{what} labels must be int32 of shape ({images.shape[0]},), got "
                    f"{labels.dtype} {labels.shape}.")
  if num_classes is None:
    raise DataError(f"{what} labels given but num_classes is None.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"{what} labels must lie in [0, {num_classes}), got "
                    f"[{labels.min()}, {labels.max()}].")


def os_error_message(error: OSError) -> str:
  """One line naming the unreadable path and why, e.g. a permission problem and its fix."""
  path = error.filename or "a data file"
  reason = error.strerror or one_line(error)
  hint = (" (check the file permissions: chmod -R u+rX PATH)"
          if isinstance(error, PermissionError) else "")
  return f"cannot read {path}: {reason}{hint}."


def split_indices(labels: Optional[np.ndarray], num_examples: int, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded train/test index split, stratified by label when labels allow it.

  Returns (train_idx, test_idx); test_idx is empty when test_fraction <= 0.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"data.test_fraction must be in [0, 1), got {test_fraction}.")
  all_idx = np.arange(num_examples)
  if test_fraction == 0.0:
    return all_idx, np.zeros((0,), np.int64)
  if num_examples - math.ceil(test_fraction * num_examples) < 1:
    raise DataError(f"{num_examples} labelled examples are too few to hold out "
                    f"data.test_fraction={test_fraction} of them as the probe's test set; add "
                    f"data, or pass --config.data.test_fraction=0 and "
                    f"--config.eval.probe_after_training=False.")
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  try:
    train_idx, test_idx = model_selection.train_test_split(
        all_idx, test_size=test_fraction, random_state=seed, shuffle=True, stratify=labels)
  except ValueError:
    # Too few examples of some class (or too small a test set) to stratify.
    train_idx, test_idx = model_selection.train_test_split(
        all_idx, test_size=test_fraction, random_state=seed, shuffle=True)
  return np.asarray(train_idx), np.asarray(test_idx)


def labelled_split(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                    config) -> ImageDataset:
  """Builds an ImageDataset from one labelled pool with the config's seeded split."""
  train_idx, test_idx = split_indices(labels, len(images), float(config.data.test_fraction),
                                      int(config.data.split_seed))
  train_images = images[train_idx]
  has_test = len(test_idx) > 0
  return ImageDataset(
      name=name, pretrain_images=train_images, train_images=train_images,
      train_labels=labels[train_idx],
      test_images=images[test_idx] if has_test else None,
      test_labels=labels[test_idx] if has_test else None,
      num_classes=num_classes)


def check_class_ids(labels: np.ndarray, what: str, remap: str) -> int:
  """The class count C of integer labels that are exactly the ids 0..C-1, each one used.

  Other labels (gaps, negatives) would make classes that never occur, or index out of range;
  DataError names the missing ids and the `remap` code that fixes them.
  """
  ids = np.unique(labels)
  if ids.size and ids[0] == 0 and ids[-1] == ids.size - 1:
    return int(ids.size)
  if ids.size and ids[0] < 0:
    problem = f"{np.sum(ids < 0)} of them are negative (smallest {ids[0]})"
  else:
    unused = int(ids[-1]) + 1 - ids.size
    problem = f"missing {_missing_ids(ids)}: {unused} of the ids 0..{ids[-1]} unused"
  raise DataError(f"{what}: labels must be the class ids 0..C-1, each one used, but the "
                  f"{ids.size} distinct labels span {ids[0]}..{ids[-1]} ({problem}); remap "
                  f"them with {remap}.")


def _missing_ids(ids: np.ndarray, limit: int = 3) -> str:
  """'1..999999' or '2, 5..7 and 4 more gaps': the ids absent from 0..ids[-1] (ids sorted, >= 0)."""
  prev = np.concatenate([[-1], ids[:-1]])
  at = np.flatnonzero(ids - prev > 1)
  gaps = [(int(prev[i]) + 1, int(ids[i]) - 1) for i in at[:limit]]
  text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in gaps)
  return text + (f" and {len(at) - limit} more gaps" if len(at) > limit else "")
