"""Image datasets as uint8 NHWC numpy arrays, loaded once on the host.

`load_dataset(config)` dispatches on `config.dataset`. Every loader returns an `ImageDataset`
holding the pre-training images, the linear probe's train/test sets and the class count.
Nothing here downloads implicitly: tfds datasets are only fetched when `config.download` is set,
and every missing dataset raises `DatasetUnavailableError` with the exact fix.
"""

import collections
import concurrent.futures
import dataclasses
import importlib.util
import io
import logging
import math
import os
import pickle
import tarfile
import zipfile
from typing import Optional, Sequence

import numpy as np

from metaug_jax import config_base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10",
               "fashion_mnist": "fashion_mnist"}
_STL10_PRETRAIN_SPLITS = ("train+unlabelled", "train")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class DatasetUnavailableError(RuntimeError):
  """The dataset is not on disk (or not readable here); the message says what to do."""


class DataError(ValueError):
  """The user's data cannot be used as it is: a one-line message naming the file and the fix."""


def _one_line(text) -> str:
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


def load_dataset(config) -> ImageDataset:
  """Loads the dataset `config.dataset` (one of config_base.DATASETS) into host memory."""
  from metaug_jax.data import idx, subset  # pylint: disable=g-import-not-at-top (they use this)
  loaders = {
      "fashion_mnist": lambda c: idx.load_fashion_mnist(c, _load_tfds),
      "idx": idx.load_idx_dataset,
      "digits": _load_digits,
      "cifar10": _load_tfds,
      "cifar100": _load_tfds,
      "stl10": _load_tfds,
      "tiny_imagenet": _load_tiny_imagenet,
      "cifar_archive": _load_cifar_archive,
      "folder": _load_folder,
      "npz": _load_npz,
  }
  assert set(loaders) == set(config_base.DATASETS), "loaders out of sync with DATASETS"
  if config.dataset not in loaders:
    raise ValueError(f"Unknown dataset {config.dataset!r}; allowed values: "
                     f"{', '.join(config_base.DATASETS)}.")
  if config.dataset in _TFDS_NAMES:
    dataset = loaders[config.dataset](config)
  else:
    try:
      dataset = loaders[config.dataset](config)
    except OSError as e:  # a local file or folder that exists but cannot be read
      raise DataError(_os_error_message(e)) from e
  return subset.limit_train_examples(dataset, config.data.max_train_examples,
                                     config.data.split_seed)


def _os_error_message(error: OSError) -> str:
  """One line naming the unreadable path and why, e.g. a permission problem and its fix."""
  path = error.filename or "a data file"
  reason = error.strerror or _one_line(error)
  hint = (" (check the file permissions: chmod -R u+rX PATH)"
          if isinstance(error, PermissionError) else "")
  return f"cannot read {path}: {reason}{hint}."


# ---- splitting ---------------------------------------------------------------------------


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


def _labelled_split(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
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


# ---- digits ------------------------------------------------------------------------------


def _load_digits(config) -> ImageDataset:
  """scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255), seeded stratified split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  return _labelled_split("digits", images, labels, 10, config)


# ---- tensorflow-datasets -----------------------------------------------------------------


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _tfds_unavailable_message(name: str, data_dir: str, reason: str) -> str:
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


def _tfds_data_dir_root(builder, data_dir: Optional[str]) -> str:
  """The root data_dir tfds resolved (argument, $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if data_dir:
    return str(data_dir)
  # builder.data_dir is <root>/<name>/<version>.
  return os.path.dirname(os.path.dirname(str(builder.data_dir)))


def _tfds_prepare(name: str, data_dir: Optional[str]) -> None:
  """Downloads and prepares `name` as ArrayRecord (needs network and tensorflow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return
  if not _tensorflow_available():
    raise DatasetUnavailableError(
        f"--config.download=True asks to prepare {name!r}, and tfds needs TensorFlow to prepare "
        f"image datasets: pip install 'metaug-jax[prepare]' (or pip install tensorflow-cpu), "
        f"then run again.\n" + _tfds_unavailable_message(
            name, _tfds_data_dir_root(builder, data_dir), "it is not prepared yet."))
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


def _tfds_read_split(name: str, split: str, data_dir: Optional[str], with_labels: bool):
  """Reads one split as uint8 NHWC (+ int32 labels), without TensorFlow when possible."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _data_source_to_numpy(source, with_labels)
  except (NotImplementedError, AssertionError, FileNotFoundError, KeyError, ValueError) as e:
    error = e
  builder = tfds.builder(name, data_dir=data_dir)
  root = _tfds_data_dir_root(builder, data_dir)
  if not builder.is_prepared():
    raise DatasetUnavailableError(_tfds_unavailable_message(
        name, root, f"no prepared copy found at {builder.data_dir}.")) from error
  if not _tensorflow_available():
    raise DatasetUnavailableError(_tfds_unavailable_message(
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


def _load_tfds(config) -> ImageDataset:
  """CIFAR-10/100, STL-10 and Fashion-MNIST from a prepared tfds copy (ArrayRecord, read without TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = _TFDS_NAMES[config.dataset]
  data_dir = config.data_dir or None
  pretrain_split = "train"
  if name == "stl10":
    pretrain_split = config.data.stl10_pretrain_split
    if pretrain_split not in _STL10_PRETRAIN_SPLITS:
      raise ValueError(f"data.stl10_pretrain_split must be one of {_STL10_PRETRAIN_SPLITS}, "
                       f"got {pretrain_split!r}.")
  if config.download:
    _tfds_prepare(name, data_dir)
  train_images, train_labels = _tfds_read_split(name, "train", data_dir, True)
  test_images, test_labels = _tfds_read_split(name, "test", data_dir, True)
  pretrain_images = train_images
  if pretrain_split == "train+unlabelled":
    unlabelled, _ = _tfds_read_split(name, "unlabelled", data_dir, False)
    pretrain_images = np.concatenate([train_images, unlabelled], axis=0)
  num_classes = tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes
  return ImageDataset(name=name, pretrain_images=pretrain_images, train_images=train_images,
                      train_labels=train_labels, test_images=test_images,
                      test_labels=test_labels, num_classes=int(num_classes))


# ---- image files -------------------------------------------------------------------------


def _is_image_file(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(path).startswith(".")


def _raise(error: Exception):
  """os.walk's onerror: an unreadable folder is an error, not a folder silently skipped."""
  raise error


def _list_images(folder: str, recursive: bool) -> list[str]:
  """Sorted image file paths in `folder` (and its sub-folders when recursive)."""
  if not recursive:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if _is_image_file(f) and os.path.isfile(os.path.join(folder, f)))
  paths = []
  for root, dirs, files in os.walk(folder, onerror=_raise):
    dirs.sort()
    paths.extend(os.path.join(root, f) for f in sorted(files) if _is_image_file(f))
  return paths


def _image_header(path: str) -> tuple[str, tuple[int, int]]:
  """(PIL mode, (width, height)) of an image file, reading only its header."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      return img.mode, img.size
  except Exception as e:  # PIL raises several types for bad files.
    raise DataError(_bad_image_message(path, e)) from e


def _bad_image_message(path: str, error: Exception) -> str:
  """One line for an image file PIL cannot decode: which file, why, and what to do."""
  if isinstance(error, PermissionError):
    return _os_error_message(error)
  return (f"Cannot read image {path} ({type(error).__name__}: {_one_line(error)}); "
          f"replace or remove the file.")


def _read_image(path: str, mode: str, size_wh: tuple[int, int]) -> np.ndarray:
  """Decodes one file to uint8 (H, W, C) in PIL mode 'L' or 'RGB', bilinear-resized to size_wh."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img = img.convert(mode)
      if img.size != size_wh:
        img = img.resize(size_wh, Image.BILINEAR)
      array = np.asarray(img, np.uint8)
  except Exception as e:  # PIL raises several types for bad files.
    raise DataError(_bad_image_message(path, e)) from e
  return array[..., None] if array.ndim == 2 else array


def _read_images(paths: Sequence[str], mode: str, size_wh: tuple[int, int]) -> np.ndarray:
  """Decodes files into one uint8 (N, H, W, C) array, in parallel threads (PIL frees the GIL)."""
  channels = 1 if mode == "L" else 3
  out = np.empty((len(paths), size_wh[1], size_wh[0], channels), np.uint8)
  def read_into(i):
    out[i] = _read_image(paths[i], mode, size_wh)
  workers = min(16, (os.cpu_count() or 1) + 4)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(read_into, range(len(paths))))
  return out


def _common_format(paths: Sequence[str], size: int) -> tuple[str, tuple[int, int]]:
  """('L' if every image is grey else 'RGB', (W, H) of `size` or the most common size)."""
  headers = [_image_header(p) for p in paths]
  mode = "L" if all(m in _GREY_MODES for m, _ in headers) else "RGB"
  if size > 0:
    return mode, (size, size)
  counts = collections.Counter(s for _, s in headers)
  best = max(counts.values())
  # Most common size; ties go to the size seen first.
  size_wh = next(s for _, s in headers if counts[s] == best)
  return mode, size_wh


# ---- tiny imagenet -----------------------------------------------------------------------


def _tiny_imagenet_layout_message(data_dir: str, problem: str) -> str:
  return (f"Tiny ImageNet not found: {problem}\n"
          f"Expected --config.data_dir={data_dir or 'DIR'} to hold the extracted archive "
          f"({TINY_IMAGENET_URL}):\n"
          f"  DIR/train/<wnid>/images/*.JPEG\n"
          f"  DIR/val/images/*.JPEG and DIR/val/val_annotations.txt "
          f"(or DIR/val/<wnid>/images/*, or DIR/val/<wnid>/*)")


def _load_tiny_imagenet(config) -> ImageDataset:
  """Tiny ImageNet (200 classes, 64x64 RGB) from its extracted folder: train and val splits."""
  data_dir = config.data_dir
  train_dir = os.path.join(data_dir, "train")
  val_dir = os.path.join(data_dir, "val")
  if not data_dir or not os.path.isdir(train_dir):
    raise DatasetUnavailableError(_tiny_imagenet_layout_message(
        data_dir, f"no train/ folder in {data_dir!r}."))
  classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
  if not classes:
    raise DatasetUnavailableError(_tiny_imagenet_layout_message(
        data_dir, f"{train_dir} has no class folders."))
  class_index = {c: i for i, c in enumerate(classes)}
  train_paths, train_labels = [], []
  for c in classes:
    folder = os.path.join(train_dir, c, "images")
    folder = folder if os.path.isdir(folder) else os.path.join(train_dir, c)
    paths = _list_images(folder, recursive=False)
    train_paths += paths
    train_labels += [class_index[c]] * len(paths)
  if not train_paths:
    raise DatasetUnavailableError(_tiny_imagenet_layout_message(
        data_dir, f"no images under {train_dir}/<wnid>/images/."))
  val_paths, val_labels = _tiny_imagenet_val(val_dir, class_index, data_dir)
  size_wh = (64, 64)
  train_images = _read_images(train_paths, "RGB", size_wh)
  val_images = _read_images(val_paths, "RGB", size_wh)
  return ImageDataset(
      name="tiny_imagenet", pretrain_images=train_images, train_images=train_images,
      train_labels=np.asarray(train_labels, np.int32), test_images=val_images,
      test_labels=np.asarray(val_labels, np.int32), num_classes=len(classes))


def _tiny_imagenet_val(val_dir: str, class_index: dict, data_dir: str):
  """Paths and labels of the val split: annotations file layout or class sub-folders."""
  annotations = os.path.join(val_dir, "val_annotations.txt")
  paths, labels = [], []
  if os.path.isfile(annotations):
    with open(annotations) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 2 or fields[1] not in class_index:
          raise DataError(f"{annotations}:{line_no}: expected 'filename<TAB>wnid...' with a "
                          f"wnid from train/, got {line.strip()!r}.")
        path = os.path.join(val_dir, "images", fields[0])
        if not os.path.isfile(path):
          raise DataError(f"{annotations}:{line_no}: image {path} does not exist.")
        paths.append(path)
        labels.append(class_index[fields[1]])
  elif os.path.isdir(val_dir):
    for c in sorted(os.listdir(val_dir)):
      folder = os.path.join(val_dir, c)
      if not os.path.isdir(folder) or c == "images":
        continue
      if c not in class_index:
        raise DataError(f"{folder}: class {c!r} is not one of the train/ classes.")
      sub = os.path.join(folder, "images")
      files = _list_images(sub if os.path.isdir(sub) else folder, recursive=False)
      paths += files
      labels += [class_index[c]] * len(files)
  if not paths:
    raise DatasetUnavailableError(_tiny_imagenet_layout_message(
        data_dir, f"no labelled validation images in {val_dir}."))
  return paths, labels


# ---- CIFAR python archives ---------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles only dicts/lists/bytes/numbers and numpy arrays: the CIFAR batch format."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"CIFAR archive contains a disallowed object {module}.{name}.")
    return super().find_class(module, name)


def _unpickle(data: bytes, what: str) -> dict:
  """Decodes one CIFAR pickle (Python 2 era: encoding='bytes'); keys become str."""
  try:
    obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:
    raise DataError(f"Cannot unpickle {what}: {type(e).__name__}: {_one_line(e)}") from e
  if not isinstance(obj, dict):
    raise DataError(f"{what} is not a CIFAR batch (expected a dict, got {type(obj).__name__}).")
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_archive_members(path: str) -> dict[str, bytes]:
  """{basename: bytes} of the CIFAR files in a .tar.gz archive or an (extracted) folder."""
  wanted = {"data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
            "test_batch", "batches.meta", "train", "test", "meta"}
  members = {}
  if os.path.isfile(path):
    try:
      with tarfile.open(path, "r:*") as tar:
        for member in tar.getmembers():
          base = os.path.basename(member.name)
          if member.isfile() and base in wanted:
            members[base] = tar.extractfile(member).read()
    except tarfile.TarError as e:
      raise DataError(f"{path} is not a readable tar archive: {_one_line(e)}") from e
    return members
  for sub in ("", "cifar-10-batches-py", "cifar-100-python"):
    folder = os.path.join(path, sub)
    if os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f))
                                     for f in ("data_batch_1", "train")):
      for f in wanted:
        if os.path.isfile(os.path.join(folder, f)):
          with open(os.path.join(folder, f), "rb") as fh:
            members[f] = fh.read()
      break
  return members


def _cifar_batch(batch: dict, label_key: str, what: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 NHWC images, int32 labels) from one unpickled CIFAR batch (rows are CHW 3x32x32)."""
  if "data" not in batch or label_key not in batch:
    raise DataError(f"{what} lacks the 'data' or {label_key!r} entry.")
  data = np.asarray(batch["data"], np.uint8)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataError(f"{what}: 'data' must be (N, 3072), got {data.shape}.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(batch[label_key], np.int32)
  return np.ascontiguousarray(images), labels


def _load_cifar_archive(config) -> ImageDataset:
  """CIFAR-10/100 from the python pickle archive (.tar.gz or extracted folder) on disk."""
  path = config.data_dir
  expected = ("--config.data_dir must be cifar-10-python.tar.gz / cifar-100-python.tar.gz or "
              "the extracted cifar-10-batches-py/ or cifar-100-python/ folder "
              "(https://www.cs.toronto.edu/~kriz/cifar.html).")
  if not path or not os.path.exists(path):
    raise DatasetUnavailableError(f"CIFAR archive not found at {path!r}. {expected}")
  members = _read_archive_members(path)
  if "data_batch_1" in members:
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if n not in members]
    if missing:
      raise DatasetUnavailableError(f"CIFAR-10 archive {path} lacks {missing}. {expected}")
    train = [_cifar_batch(_unpickle(members[n], n), "labels", n) for n in names]
    train_images = np.concatenate([t[0] for t in train])
    train_labels = np.concatenate([t[1] for t in train])
    test_images, test_labels = _cifar_batch(_unpickle(members["test_batch"], "test_batch"),
                                            "labels", "test_batch")
    num_classes, name = 10, "cifar10"
  elif "train" in members and "test" in members:
    train_images, train_labels = _cifar_batch(_unpickle(members["train"], "train"),
                                              "fine_labels", "train")
    test_images, test_labels = _cifar_batch(_unpickle(members["test"], "test"),
                                            "fine_labels", "test")
    num_classes, name = 100, "cifar100"
  else:
    raise DatasetUnavailableError(f"No CIFAR batches found in {path}. {expected}")
  return ImageDataset(name=f"cifar_archive:{name}", pretrain_images=train_images,
                      train_images=train_images, train_labels=train_labels,
                      test_images=test_images, test_labels=test_labels,
                      num_classes=num_classes)


# ---- user image folder -------------------------------------------------------------------


def _scan_split(folder: str) -> tuple[list[str], Optional[list[str]], Optional[list[str]]]:
  """(paths, class names of each path or None, sorted classes or None) of one split folder.

  Sub-folders holding images make it an ImageFolder (labelled); else its image files are an
  unlabelled flat folder.
  """
  subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                   and not d.startswith("."))
  class_paths = {d: _list_images(os.path.join(folder, d), recursive=True) for d in subdirs}
  classes = [d for d in subdirs if class_paths[d]]
  if classes:
    paths, names = [], []
    for c in classes:
      paths += class_paths[c]
      names += [c] * len(class_paths[c])
    return paths, names, classes
  return _list_images(folder, recursive=False), None, None


def _no_images_message(folder: str) -> str:
  """One line for a folder without image files: what it holds instead and what is read."""
  names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
  more = f" and {len(names) - 3} more" if len(names) > 3 else ""
  held = f"it holds only {', '.join(names[:3])}{more}" if names else "it is empty"
  return (f"No images found in {folder} ({held}); the folder loader reads "
          f"{', '.join(IMAGE_EXTENSIONS)} files in DIR/<class>/ (labelled) or DIR/ "
          f"(unlabelled).")


def _load_folder(config) -> ImageDataset:
  """User images: ImageFolder (class sub-folders, labelled) or a flat folder (unlabelled)."""
  root = config.data_dir
  if not root or not os.path.isdir(root):
    raise DatasetUnavailableError(
        f"Image folder {root!r} not found: pass --config.data_dir=DIR holding class "
        f"sub-folders (DIR/<class>/*.png, labelled) or image files (DIR/*.jpg, unlabelled), "
        f"optionally split into DIR/train and DIR/test (or DIR/val).")
  train_dir, test_dir = root, None
  if os.path.isdir(os.path.join(root, "train")):
    train_dir = os.path.join(root, "train")
    for name in ("test", "val"):
      if os.path.isdir(os.path.join(root, name)):
        test_dir = os.path.join(root, name)
        break
  train_paths, train_names, classes = _scan_split(train_dir)
  if not train_paths:
    raise DataError(_no_images_message(train_dir))
  test_paths, test_names = [], None
  if test_dir is not None:
    test_paths, test_names, _ = _scan_split(test_dir)
    if classes is None:
      logging.warning("Unlabelled folder %s: ignoring %s (no probe without labels).",
                      train_dir, test_dir)
      test_paths = []
    elif test_paths and test_names is None:
      raise DataError(f"{train_dir} has class sub-folders but {test_dir} has none; give the "
                      f"test images the same <class>/ layout.")
    elif not test_paths:
      raise DataError(_no_images_message(test_dir))
  size = int(config.data.folder_image_size)
  mode, size_wh = _common_format(train_paths + test_paths, size)
  images = _read_images(train_paths, mode, size_wh)
  name = f"folder:{os.path.basename(os.path.normpath(root))}"
  if classes is None:
    return ImageDataset(name=name, pretrain_images=images, train_images=images,
                        train_labels=None, test_images=None, test_labels=None, num_classes=None)
  class_index = {c: i for i, c in enumerate(classes)}
  labels = np.asarray([class_index[c] for c in train_names], np.int32)
  if not test_paths:
    return _labelled_split(name, images, labels, len(classes), config)
  unknown = sorted(set(test_names) - set(class_index))
  if unknown:
    raise DataError(f"{test_dir} has classes {unknown} that {train_dir} lacks.")
  test_images = _read_images(test_paths, mode, size_wh)
  test_labels = np.asarray([class_index[c] for c in test_names], np.int32)
  return ImageDataset(name=name, pretrain_images=images, train_images=images,
                      train_labels=labels, test_images=test_images, test_labels=test_labels,
                      num_classes=len(classes))


# ---- npz ---------------------------------------------------------------------------------


def _npz_files(data_dir: str, test_file: str) -> tuple[str, str]:
  """(train file, test file or "") named by data_dir: an .npz file, or a folder holding one .npz
  or the pair train.npz + test.npz (test.npz is the test file unless data.test_file is set)."""
  if not data_dir or not os.path.exists(data_dir):
    raise DatasetUnavailableError(
        f".npz file {data_dir!r} not found: pass --config.data_dir=FILE.npz (or a folder "
        f"holding one .npz file) with 'x' (uint8, N x H x W or N x H x W x C) and optionally "
        f"'y' (integer labels).")
  if not os.path.isdir(data_dir):
    return data_dir, test_file
  names = sorted(f for f in os.listdir(data_dir) if f.endswith(".npz") and not f.startswith("."))
  if len(names) == 1:
    return os.path.join(data_dir, names[0]), test_file
  if names == ["test.npz", "train.npz"]:
    return os.path.join(data_dir, "train.npz"), test_file or os.path.join(data_dir, "test.npz")
  listed = f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
  raise DataError(f"{data_dir} holds {len(names)} .npz files{listed}; a data_dir folder must "
                  f"hold exactly one, or train.npz and test.npz: pass "
                  f"--config.data_dir=FILE.npz to choose one.")


def _read_npz(path: str, flag: str = "data_dir") -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Validated (uint8 NHWC images, int64 labels or None) from an .npz with `x` and optional `y`.

  The labels' class ids are checked by the caller, on the union of the train and test labels.
  """
  if not path or not os.path.isfile(path):
    raise DatasetUnavailableError(
        f".npz file {path!r} not found: pass --config.{flag}=FILE.npz holding 'x' (uint8, "
        f"N x H x W or N x H x W x C) and optionally 'y' (integer labels).")
  x, y = _npz_arrays(path)
  return _npz_images(x, path), None if y is None else _npz_labels(y, x.shape[0], path)


def _npz_arrays(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """The raw 'x' and 'y' (or None) arrays of an .npz archive; DataError if it is not one."""
  how = "write it with np.savez(FILE, x=images, y=labels)"
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise DataError(f"{path} holds a single .npy array, not an .npz archive of named "
                      f"arrays; {how}.")
    with loaded as f:
      if "x" not in f:
        raise DataError(f"{path} has no 'x' array (it holds {sorted(f.keys()) or 'none'}); "
                        f"{how}.")
      return f["x"], f["y"] if "y" in f else None
  except (DataError, PermissionError):
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"cannot read {path} as an .npz archive ({type(e).__name__}: "
                    f"{_one_line(e)}); {how}.") from e


def _npz_images(x: np.ndarray, path: str) -> np.ndarray:
  """`x` as uint8 (N, H, W, C), C in (1, 3); DataError naming the conversion otherwise."""
  if x.dtype != np.uint8:
    raise DataError(f"{path}: 'x' must be uint8 pixels in 0..255, got {x.dtype}"
                    f"{_uint8_hint(x)}.")
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise DataError(f"{path}: 'x' must be N x H x W (grey) or N x H x W x C with C in (1, 3), "
                    f"got shape {x.shape}.{_layout_hint(x.shape)}")
  if x.shape[0] == 0 or x.size == 0:
    raise DataError(f"{path}: 'x' holds no images (shape {x.shape}).")
  return x


def _uint8_hint(x: np.ndarray) -> str:
  """How to turn non-uint8 pixels into uint8, judged from their range."""
  if x.size == 0 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    return ""
  lo, hi = float(np.min(x)), float(np.max(x))
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return "; it holds NaN or inf values, replace them first"
  if np.issubdtype(x.dtype, np.floating) and lo >= 0 and hi <= 1:
    return "; for floats in [0, 1] use x = np.round(x * 255).astype(np.uint8)"
  if lo >= 0 and hi <= 255:
    return "; its values fit: use x = np.round(x).astype(np.uint8)"
  return f"; its values span [{lo:g}, {hi:g}]: rescale them to 0..255 first"


def _layout_hint(shape: tuple) -> str:
  """A fix for the usual wrong image layouts: channels-first, RGBA, grey + alpha."""
  if len(shape) != 4:
    return ""
  if shape[1] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
    alpha = "[..., :3]" if shape[1] == 4 else ""
    return f" It looks channels-first (N, C, H, W): use x = x.transpose(0, 2, 3, 1){alpha}."
  if shape[-1] == 4:
    return " It looks RGBA: drop the alpha channel with x = x[..., :3]."
  if shape[-1] == 2:
    return " It looks grey + alpha: keep the grey channel with x = x[..., :1]."
  return ""


def _npz_labels(y: np.ndarray, num_images: int, path: str) -> np.ndarray:
  """`y` as int64 (N,); DataError unless it holds one integer label per image."""
  if not np.issubdtype(y.dtype, np.integer):
    whole = (np.issubdtype(y.dtype, np.floating) and y.size and np.all(np.isfinite(y))
             and np.all(y == np.round(y)))
    hint = "; they are whole numbers: use y = y.astype(np.int64)" if whole else ""
    raise DataError(f"{path}: 'y' must hold integer class ids, got {y.dtype}{hint}.")
  if y.shape != (num_images,):
    raise DataError(f"{path}: 'y' must hold one label per image, shape ({num_images},), got "
                    f"{y.shape}.")
  return y.astype(np.int64)


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


def _load_npz(config) -> ImageDataset:
  """Images (and optional labels) from an .npz file; optional separate test .npz."""
  path, test_file = _npz_files(config.data_dir, config.data.test_file)
  x, y = _read_npz(path)
  name = f"npz:{os.path.basename(path)}"
  if not test_file:
    if y is None:
      return ImageDataset(name=name, pretrain_images=x, train_images=x, train_labels=None,
                          test_images=None, test_labels=None, num_classes=None)
    num_classes = check_class_ids(y, path, "y = np.unique(y, return_inverse=True)[1]")
    return _labelled_split(name, x, y.astype(np.int32), num_classes, config)
  tx, ty = _read_npz(test_file, "data.test_file")
  if (ty is None) != (y is None):
    raise DataError(f"{path} and {test_file} must both have 'y' or both lack it.")
  if tx.shape[1:] != x.shape[1:]:
    raise DataError(f"{test_file} images are {tx.shape[1:]}, {path} {x.shape[1:]}; they must "
                    f"match.")
  num_classes = None
  if y is not None:
    num_classes = check_class_ids(
        np.concatenate([y, ty]), f"{path} with {test_file}",
        "ids = np.unique(np.concatenate([y, y_test]), return_inverse=True)[1]; "
        "y, y_test = ids[:len(y)], ids[len(y):]")
    y, ty = y.astype(np.int32), ty.astype(np.int32)
  return ImageDataset(name=name, pretrain_images=x, train_images=x, train_labels=y,
                      test_images=tx if ty is not None else None, test_labels=ty,
                      num_classes=num_classes)
