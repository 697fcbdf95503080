"""CIFAR-10/100 from the python pickle archive (.tar.gz or extracted folder) on disk."""

import io
import os
import pickle
import tarfile

import numpy as np

from metaug_jax.data.dataset import DataError, DatasetUnavailableError, ImageDataset, one_line


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
    raise DataError(f"Cannot unpickle {what}: {type(e).__name__}: {one_line(e)}") from e
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
      raise DataError(f"{path} is not a readable tar archive: {one_line(e)}") from e
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


def load(config) -> ImageDataset:
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
