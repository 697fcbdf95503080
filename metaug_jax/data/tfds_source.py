"""CIFAR-10/100 and STL-10 from a prepared tensorflow-datasets copy, read without TensorFlow.

Nothing downloads unless `config.download` is set; a missing copy raises
DatasetUnavailableError naming every fix.
"""

import importlib.util
import os
from typing import Optional

import numpy as np

from metaug_jax.data.dataset import DatasetUnavailableError, ImageDataset

# config.dataset -> the tfds name of the datasets read here.
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10",
            "fashion_mnist": "fashion_mnist"}
_STL10_PRETRAIN_SPLITS = ("train+unlabelled", "train")


def tensorflow_available() -> bool:
  """Whether TensorFlow is installed (tfds needs it to prepare, or to read non-ArrayRecord)."""
  return importlib.util.find_spec("tensorflow") is not None


def _unavailable_message(name: str, data_dir: str, reason: str) -> str:
  """The message of a DatasetUnavailableError for a tfds dataset, with every fix."""
  return (
      f"Dataset {name!r} is not available: {reason}\n"
      f"Looked in data_dir={data_dir} (from --config.data_dir, else $TFDS_DATA_DIR, else "
      f"~/tensorflow_datasets).\n"
      f"Fixes:\n"
      f"  * point --config.data_dir=DIR (or set TFDS_DATA_DIR=DIR) at a prepared copy;\n"
      f"  * on a machine with network access prepare one (TensorFlow is needed only to prepare):\n"
      f"      pip install tensorflow-cpu\n"
      f"      tfds build {name} --file_format=array_record --data_dir=DIR\n"
      f"    then copy DIR here, or run with --config.download=True on a networked machine.")


def _data_dir_root(builder, data_dir: Optional[str]) -> str:
  """The root data_dir tfds resolved (argument, $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if data_dir:
    return str(data_dir)
  # builder.data_dir is <root>/<name>/<version>.
  return os.path.dirname(os.path.dirname(str(builder.data_dir)))


def _prepare(name: str, data_dir: Optional[str]) -> None:
  """Downloads and prepares `name` as ArrayRecord (needs network and tensorflow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return
  if not tensorflow_available():
    raise DatasetUnavailableError(
        f"--config.download=True asks to prepare {name!r}, and tfds needs TensorFlow to prepare "
        f"image datasets: pip install 'metaug-jax[prepare]' (or pip install tensorflow-cpu), "
        f"then run again.\n" + _unavailable_message(
            name, _data_dir_root(builder, data_dir), "it is not prepared yet."))
  builder.download_and_prepare(file_format="array_record")


def _data_source_to_numpy(source, with_labels: bool):
  """Decodes every record of a tfds random-access data source into (images, labels)."""
  n = len(source)
  first = source[0]
  images = np.empty((n,) + tuple(np.shape(first["image"])), np.uint8)
  labels = np.empty((n,), np.int32) if with_labels else None
  for i in range(n):
    record = first if i == 0 else source[i]
    images[i] = record["image"]
    if with_labels:
      labels[i] = record["label"]
  return images, labels


def _read_split(name: str, split: str, data_dir: Optional[str], with_labels: bool):
  """Reads one split as uint8 NHWC (+ int32 labels), without TensorFlow when possible."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _data_source_to_numpy(source, with_labels)
  except (NotImplementedError, AssertionError, FileNotFoundError, KeyError, ValueError) as e:
    error = e
  builder = tfds.builder(name, data_dir=data_dir)
  root = _data_dir_root(builder, data_dir)
  if not builder.is_prepared():
    raise DatasetUnavailableError(_unavailable_message(
        name, root, f"no prepared copy found at {builder.data_dir}.")) from error
  if not tensorflow_available():
    raise DatasetUnavailableError(_unavailable_message(
        name, root,
        f"the copy at {builder.data_dir} is prepared as "
        f"{builder.info.file_format}, which only TensorFlow can read "
        f"(pip install tensorflow-cpu), or rebuild it as array_record "
        f"({type(error).__name__}: {error}).")) from error
  data = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, download=False,
                                 batch_size=-1))
  images = np.asarray(data["image"], np.uint8)
  labels = np.asarray(data["label"], np.int32) if with_labels else None
  return images, labels


def load(config) -> ImageDataset:
  """CIFAR-10/100 and STL-10 from a prepared tfds copy (ArrayRecord, read without TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = DATASETS[config.dataset]
  data_dir = config.data_dir or None
  pretrain_split = "train"
  if name == "stl10":
    pretrain_split = config.data.stl10_pretrain_split
    if pretrain_split not in _STL10_PRETRAIN_SPLITS:
      raise ValueError(f"data.stl10_pretrain_split must be one of {_STL10_PRETRAIN_SPLITS}, "
                       f"got {pretrain_split!r}.")
  if config.download:
    _prepare(name, data_dir)
  train_images, train_labels = _read_split(name, "train", data_dir, True)
  test_images, test_labels = _read_split(name, "test", data_dir, True)
  pretrain_images = train_images
  if pretrain_split == "train+unlabelled":
    unlabelled, _ = _read_split(name, "unlabelled", data_dir, False)
    pretrain_images = np.concatenate([train_images, unlabelled], axis=0)
  num_classes = tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes
  return ImageDataset(name=name, pretrain_images=pretrain_images, train_images=train_images,
                      train_labels=train_labels, test_images=test_images,
                      test_labels=test_labels, num_classes=int(num_classes))
