"""IDX files (the MNIST format) and the data sets stored in them: Fashion-MNIST, MNIST, KMNIST.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the rank R), R big-endian uint32
dimensions, then the values in big-endian C order (LeCun et al., "The MNIST database"). Files
may be gzipped; the reader decides from the content, not the name. `config.dataset="idx"` loads
any images/labels pair for a train and a test split from `config.data_dir`;
`config.dataset="fashion_mnist"` checks for Fashion-MNIST's sizes and also reads tfds's copy.
"""

import dataclasses
import gzip
import logging
import os
import re
import zlib
from typing import Callable, Optional

import numpy as np

from metaug_jax.data import dataset as sources

# dtype code -> big-endian numpy dtype.
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist
FASHION_MNIST_SHAPES = {"train": (60000, 28, 28, 1), "test": (10000, 28, 28, 1)}
FASHION_MNIST_CLASSES = 10
_REFETCH = "download it again (or reinstall its package)"
# <stem>-<images|labels><- or .>idx<rank>-ubyte[.gz]: the names of the MNIST family's files.
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<kind>images|labels)[-.]idx(?P<rank>[13])-ubyte"
                   r"(?P<gz>\.gz)?$")
_TRAIN_TOKENS = ("train",)
_TEST_TOKENS = ("t10k", "test")
_STANDARD = "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-..., " \
            "t10k-labels-..."


# ---- the file format ------------------------------------------------------------------------


def encode_idx(array: np.ndarray) -> bytes:
  """The IDX bytes of `array` (any dtype of IDX_DTYPES, any rank): the inverse of `parse_idx`."""
  codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
  code = codes.get(np.dtype(array.dtype).newbyteorder("="))
  if code is None:
    raise ValueError(f"IDX has no dtype {array.dtype}; use one of "
                     f"{', '.join(str(d.newbyteorder('=')) for d in IDX_DTYPES.values())}.")
  header = bytes([0, 0, code, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + np.ascontiguousarray(array, IDX_DTYPES[code]).tobytes()


def parse_idx(data: bytes, name: str) -> np.ndarray:
  """The array held by the (uncompressed) IDX bytes `data`; DataError naming `name` if garbled."""
  if len(data) < 4:
    raise sources.DataError(f"{name} is not an IDX file: {len(data)} bytes, shorter than the "
                            f"4-byte magic; {_REFETCH}.")
  code, rank = data[2], data[3]
  if data[0] != 0 or data[1] != 0 or code not in IDX_DTYPES:
    raise sources.DataError(
        f"{name} is not an IDX file: magic 0x{data[:4].hex()}, expected 0x0000TTRR with dtype "
        f"code TT in ({', '.join(f'{c:02x}' for c in IDX_DTYPES)}) and rank RR; {_REFETCH}.")
  header = 4 + 4 * rank
  if len(data) < header:
    raise sources.DataError(f"{name} is truncated: {len(data)} bytes, shorter than the "
                            f"{header}-byte header of a rank-{rank} IDX file; {_REFETCH}.")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
  dtype = IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  held = len(data) - header
  if held != expected:
    problem = "truncated" if held < expected else f"garbled: {held - expected} extra bytes"
    raise sources.DataError(
        f"{name} is {problem}: its header says {dtype.newbyteorder('=')} of shape {shape} "
        f"({expected} bytes), it holds {held} data bytes; {_REFETCH}.")
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
  """The array in the IDX file at `path`, gzipped or not; DataError (one line) if unreadable."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    hint = (" (check the file permissions: chmod u+r PATH)"
            if isinstance(e, PermissionError) else "")
    raise sources.DataError(f"cannot read {path}: {e.strerror or e}{hint}.") from e
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
      raise sources.DataError(f"{path} is a truncated or corrupt gzip file "
                              f"({type(e).__name__}: {sources.one_line(e)}); "
                              f"{_REFETCH}.") from e
  return parse_idx(data, path)


# ---- finding the files ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IdxPair:
  """The images and labels files of one split."""
  images: str
  labels: str


def _split_of(prefix: str) -> tuple[Optional[str], str]:
  """('train' | 'test' | None, the set's stem) of a file-name prefix: 'emnist-digits-test' ->
  ('test', 'emnist-digits'), 't10k' -> ('test', '')."""
  for split, tokens in (("train", _TRAIN_TOKENS), ("test", _TEST_TOKENS)):
    for token in tokens:
      if prefix == token:
        return split, ""
      if prefix.endswith("-" + token):
        return split, prefix[:-len(token) - 1]
  return None, prefix


def _locate(data_dir: str) -> Optional[tuple[str, Optional[str]]]:
  """(folder, stem or None) named by `data_dir`: a folder, or DIR/STEM choosing the files
  DIR/STEM-* of one set (EMNIST's folder holds several); None if neither exists."""
  if data_dir and os.path.isdir(data_dir):
    return data_dir, None
  folder, stem = os.path.dirname(data_dir) or ".", os.path.basename(data_dir)
  if data_dir and stem and os.path.isdir(folder) and any(
      n.startswith(stem + "-") for n in os.listdir(folder)):
    return folder, stem
  return None


def find_idx_files(folder: str, stem_filter: Optional[str] = None) -> dict:
  """{(stem, split, kind): path} of the files in `folder` named like the MNIST family's IDX
  images/labels (of the set `stem_filter` only, if given); an uncompressed file wins over its
  .gz twin."""
  found = {}
  for name in sorted(os.listdir(folder), key=lambda n: (n.endswith(".gz"), n)):
    m = _NAME.match(name)
    if not m or (m["kind"] == "images") != (m["rank"] == "3"):
      continue
    split, stem = _split_of(m["prefix"])
    if split is None or (stem_filter is not None and stem != stem_filter):
      continue
    found.setdefault((stem, split, m["kind"]), os.path.join(folder, name))
  return found


def idx_pairs(data_dir: str) -> dict:
  """{'train': IdxPair, 'test': IdxPair} named by `data_dir`; DatasetUnavailableError saying
  what is missing (DataError listing the sets to choose from) otherwise."""
  located = _locate(data_dir)
  if located is None:
    raise sources.DatasetUnavailableError(
        f"IDX folder {data_dir!r} not found: pass --config.data_dir=DIR holding {_STANDARD} "
        f"(or DIR/SET for the SET-train-* / SET-test-* files of EMNIST).")
  found = find_idx_files(*located)
  stems = sorted({stem for stem, _, _ in found})
  if not stems:
    raise sources.DatasetUnavailableError(
        f"No IDX files found in {data_dir}: expected {_STANDARD} (MNIST, Fashion-MNIST, "
        f"KMNIST) or SET-train-images-idx3-ubyte[.gz] with its -labels-idx1- and -test- "
        f"siblings (EMNIST).")
  if len(stems) > 1:
    names = ", ".join(s or "train/t10k" for s in stems)
    example = os.path.join(located[0], next(s for s in stems if s))
    raise sources.DataError(
        f"{data_dir} holds {len(stems)} IDX sets ({names}); choose one with "
        f"--config.data_dir=DIR/SET, e.g. --config.data_dir={example}.")
  stem = stems[0]
  missing = [f"{split} {kind}" for split in ("train", "test") for kind in ("images", "labels")
             if (stem, split, kind) not in found]
  if missing:
    have = ", ".join(os.path.basename(p) for p in found.values())
    raise sources.DatasetUnavailableError(
        f"{data_dir} lacks the {' and '.join(missing)} IDX file(s) (it has {have}); the idx "
        f"loader needs an images and a labels file for a train and a test split: {_STANDARD}.")
  return {split: IdxPair(found[(stem, split, "images")], found[(stem, split, "labels")])
          for split in ("train", "test")}


# ---- loading ----------------------------------------------------------------------------------


def _read_split(pair: IdxPair) -> tuple[np.ndarray, np.ndarray]:
  """Validated (uint8 (N, H, W, C) images, int64 (N,) labels) of one split's two files."""
  images, labels = read_idx(pair.images), read_idx(pair.labels)
  if images.dtype != np.uint8:
    raise sources.DataError(f"{pair.images} holds {images.dtype} values; images must be uint8 "
                            f"pixels (IDX dtype code 0x08).")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise sources.DataError(f"{pair.images} holds shape {images.shape}; images must be N x H x "
                            f"W (rank 3) or N x H x W x C with C in (1, 3), N > 0.")
  if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
    raise sources.DataError(f"{pair.labels} holds {labels.dtype} of shape {labels.shape}; "
                            f"labels must be one integer per image (rank 1).")
  if labels.shape[0] != images.shape[0]:
    raise sources.DataError(f"{pair.labels} holds {labels.shape[0]} labels for the "
                            f"{images.shape[0]} images of {pair.images}; use the matching pair.")
  if labels.size and labels.min() < 0:
    raise sources.DataError(f"{pair.labels} holds negative labels (smallest {labels.min()}); "
                            f"class ids must be >= 0.")
  return images, labels.astype(np.int64)


def _dataset_from_pairs(name: str, pairs: dict) -> sources.ImageDataset:
  """An ImageDataset from the train and test pairs, num_classes = the largest label + 1."""
  train_images, train_labels = _read_split(pairs["train"])
  test_images, test_labels = _read_split(pairs["test"])
  if test_images.shape[1:] != train_images.shape[1:]:
    raise sources.DataError(f"{pairs['test'].images} images are {test_images.shape[1:]}, "
                            f"{pairs['train'].images} {train_images.shape[1:]}; they must match.")
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  unused = num_classes - np.unique(np.concatenate([train_labels, test_labels])).size
  if unused:
    logging.info("%s: %d of the class ids 0..%d never occur (e.g. EMNIST letters start at 1).",
                 name, unused, num_classes - 1)
  return sources.ImageDataset(
      name=name, pretrain_images=train_images, train_images=train_images,
      train_labels=train_labels.astype(np.int32), test_images=test_images,
      test_labels=test_labels.astype(np.int32), num_classes=num_classes)


def load_idx_dataset(config) -> sources.ImageDataset:
  """`config.dataset="idx"`: any train/test images + labels IDX pairs in `config.data_dir`.

  Images are kept as stored (EMNIST's are transposed relative to MNIST's; neither pre-training
  nor the probe depends on it).
  """
  pairs = idx_pairs(config.data_dir)
  prefix = os.path.basename(pairs["train"].images).split("-images")[0]
  stem = _split_of(prefix)[1] or os.path.basename(os.path.normpath(config.data_dir))
  return _dataset_from_pairs(f"idx:{stem}", pairs)


def check_fashion_mnist(dataset: sources.ImageDataset, where: str) -> sources.ImageDataset:
  """`dataset` if it has Fashion-MNIST's sizes (60k + 10k 28x28 grey images, 10 classes)."""
  shapes = {"train": dataset.train_images.shape,
            "test": None if dataset.test_images is None else dataset.test_images.shape}
  if shapes != FASHION_MNIST_SHAPES or dataset.num_classes != FASHION_MNIST_CLASSES:
    raise sources.DataError(
        f"{where} is not Fashion-MNIST: train {shapes['train']}, test {shapes['test']}, "
        f"{dataset.num_classes} classes, expected train {FASHION_MNIST_SHAPES['train']}, test "
        f"{FASHION_MNIST_SHAPES['test']}, {FASHION_MNIST_CLASSES} classes; for other IDX data "
        f"pass --config.dataset=idx.")
  return dataset


def _fashion_mnist_missing(data_dir: str, tfds_error: Exception) -> str:
  """The message when neither IDX files nor a prepared tfds copy are found."""
  here = (f" ({FASHION_MNIST_DIR} exists on this machine)"
          if os.path.isdir(FASHION_MNIST_DIR) and data_dir != FASHION_MNIST_DIR else "")
  looked = f"no IDX files in --config.data_dir={data_dir} and " if data_dir else ""
  reason = (str(tfds_error).splitlines() or [""])[0]
  return sources.one_line(
      f"Fashion-MNIST is not available: {looked}no prepared tfds copy "
      f"({type(tfds_error).__name__}: {reason}). Fixes: apt-get install "
      f"dataset-fashion-mnist, then pass --config.data_dir={FASHION_MNIST_DIR}{here}; or point "
      f"--config.data_dir at a folder holding {_STANDARD}; or prepare tfds's copy (tfds build "
      f"fashion_mnist --file_format=array_record --data_dir=DIR, or --config.download=True on a "
      f"networked machine).")


def load_fashion_mnist(config, load_tfds: Callable) -> sources.ImageDataset:
  """`config.dataset="fashion_mnist"`: the IDX files in `config.data_dir` when it holds them,
  else tfds's prepared copy (read by `load_tfds(config)`, downloaded only with config.download).
  """
  data_dir = config.data_dir
  located = _locate(data_dir) if data_dir and not config.download else None
  if located is not None and find_idx_files(*located):
    return check_fashion_mnist(_dataset_from_pairs("fashion_mnist", idx_pairs(data_dir)),
                               data_dir)
  try:
    dataset = load_tfds(config)
  except (ImportError, sources.DatasetUnavailableError) as e:
    if config.download:
      raise
    raise sources.DatasetUnavailableError(_fashion_mnist_missing(data_dir, e)) from e
  return check_fashion_mnist(dataset, f"tfds's fashion_mnist in {data_dir or 'its data_dir'}")
