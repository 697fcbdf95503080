"""Image datasets as uint8 NHWC numpy arrays, loaded once on the host.

`load_dataset(config)` dispatches on `config.dataset` to one loader module per source
(digits, tfds_source, tiny_imagenet, cifar_archive, image_folder, npz, idx). Every loader returns an
`ImageDataset` holding the pre-training images, the linear probe's train/test sets and the
class count. Nothing here downloads implicitly: tfds datasets are only fetched when
`config.download` is set, and every missing dataset raises `DatasetUnavailableError` with the
exact fix.
"""

from metaug_jax import config_base
from metaug_jax.data import cifar_archive
from metaug_jax.data import digits
from metaug_jax.data import idx
from metaug_jax.data import image_folder
from metaug_jax.data import npz
from metaug_jax.data import subset
from metaug_jax.data import tfds_source
from metaug_jax.data import tiny_imagenet
# The dataset, its errors and the shared helpers live in dataset.py (the loaders import them
# from there); they stay importable from here.
from metaug_jax.data.dataset import DataError, DatasetUnavailableError, ImageDataset
from metaug_jax.data.dataset import check_class_ids, os_error_message, split_indices

__all__ = ["DataError", "DatasetUnavailableError", "ImageDataset", "LOADERS", "check_class_ids",
           "load_dataset", "split_indices"]

# config.dataset -> the loader of that source: config -> ImageDataset.
LOADERS = {
    "digits": digits.load,
    "cifar10": tfds_source.load,
    "cifar100": tfds_source.load,
    "stl10": tfds_source.load,
    "tiny_imagenet": tiny_imagenet.load,
    "cifar_archive": cifar_archive.load,
    "folder": image_folder.load,
    "npz": npz.load,
    "fashion_mnist": lambda c: idx.load_fashion_mnist(c, tfds_source.load),
    "idx": idx.load_idx_dataset,
}


def load_dataset(config) -> ImageDataset:
  """Loads the dataset `config.dataset` (one of config_base.DATASETS) into host memory."""
  assert set(LOADERS) == set(config_base.DATASETS), "loaders out of sync with DATASETS"
  if config.dataset not in LOADERS:
    raise ValueError(f"Unknown dataset {config.dataset!r}; allowed values: "
                     f"{', '.join(config_base.DATASETS)}.")
  if config.dataset in tfds_source.DATASETS:
    dataset = LOADERS[config.dataset](config)
  else:
    try:
      dataset = LOADERS[config.dataset](config)
    except OSError as e:  # a local file or folder that exists but cannot be read
      raise DataError(os_error_message(e)) from e
  return subset.limit_train_examples(dataset, config.data.max_train_examples,
                                     config.data.split_seed)
