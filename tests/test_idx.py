"""Tests of the IDX reader and the idx / fashion_mnist data sets (metaug_jax.data.idx), and of
data.max_train_examples (metaug_jax.data.subset)."""

import gzip
import os
import struct
import sys

import numpy as np
import pytest

from metaug_jax import config_base, config_check
from metaug_jax.data import idx
from metaug_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = idx.FASHION_MNIST_DIR
FASHION_MNIST_SHAPE = idx.FASHION_MNIST_SHAPES
_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
          np.float64: 0x0E}


def _idx_bytes(array: np.ndarray) -> bytes:
  """IDX bytes built by hand: 0, 0, dtype code, rank, big-endian uint32 dims, big-endian data."""
  a = np.asarray(array)
  header = struct.pack(">BBBB", 0, 0, _CODES[a.dtype.type], a.ndim)
  header += struct.pack(f">{a.ndim}I", *a.shape)
  return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def _write(path, data: bytes, gz: bool = False):
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)
  return str(path)


def _config(dataset, data_dir, **data):
  c = config_base.get_base_config()
  c.dataset = dataset
  c.data_dir = str(data_dir)
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _idx_dir(folder, n_train=20, n_test=10, classes=3, side=28, prefix=("train", "t10k"),
             gz=True, seed=0):
  """A folder with train/test images + labels IDX files of random data; returns the arrays."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, n, name in (("train", n_train, prefix[0]), ("test", n_test, prefix[1])):
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.uint8)
    ext = ".gz" if gz else ""
    _write(os.path.join(folder, f"{name}-images-idx3-ubyte{ext}"), _idx_bytes(images), gz)
    _write(os.path.join(folder, f"{name}-labels-idx1-ubyte{ext}"), _idx_bytes(labels), gz)
    arrays[split] = (images, labels)
  return arrays


# ---- the reader -------------------------------------------------------------------------------


def test_parse_literal_bytes():
  # uint8, rank 2, dims (2, 3): magic 00 00 08 02, then 2 and 3 as big-endian uint32.
  data = b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02\x00\x00\x00\x03" + bytes(range(6))
  np.testing.assert_array_equal(idx.parse_idx(data, "x"), [[0, 1, 2], [3, 4, 5]])
  # int16, rank 1, dims (2,): 0x0100 = 256 and 0xfffe = -2, big-endian.
  data = b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x02" + b"\x01\x00\xff\xfe"
  out = idx.parse_idx(data, "x")
  assert out.dtype == np.int16
  np.testing.assert_array_equal(out, [256, -2])


@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("shape", [(5,), (4, 3, 2), (2, 3, 4, 1), ()])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_dtypes_ranks_gzip(tmp_path, dtype, shape, gz):
  rng = np.random.default_rng(1)
  array = (rng.normal(size=shape) * 50).astype(dtype)
  path = _write(tmp_path / "a-images-idx3-ubyte", _idx_bytes(array), gz)
  out = idx.read_idx(path)
  assert out.dtype == np.dtype(dtype) and out.shape == shape
  np.testing.assert_array_equal(out, array)
  np.testing.assert_array_equal(idx.parse_idx(idx.encode_idx(array), "x"), array)


def _one_line_error(path, match):
  with pytest.raises(sources.DataError, match=match) as e:
    idx.read_idx(str(path))
  message = str(e.value)
  assert "\n" not in message and str(path) in message and "download it again" in message
  return message


def test_truncated_and_garbled_files_give_one_line_errors(tmp_path):
  good = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
  _one_line_error(_write(tmp_path / "short", good[:-1]), "truncated: .*uint8 of shape "
                  r"\(2, 3, 4\) \(24 bytes\), it holds 23")
  _one_line_error(_write(tmp_path / "extra", good + b"\x00\x00"), "2 extra bytes")
  _one_line_error(_write(tmp_path / "header", good[:9]), "shorter than the 16-byte header")
  _one_line_error(_write(tmp_path / "tiny", b"\x00\x00"), "shorter than the 4-byte magic")
  _one_line_error(_write(tmp_path / "magic", b"\x08\x03" + good[2:]), "magic 0x08030803")
  _one_line_error(_write(tmp_path / "dtype", b"\x00\x00\x07" + good[3:]), "magic 0x00000703")
  _one_line_error(_write(tmp_path / "png", b"\x89PNG\r\n\x1a\n" + good), "not an IDX file")
  gz = gzip.compress(good)
  _one_line_error(_write(tmp_path / "cut.gz", gz[:len(gz) // 2]), "truncated or corrupt gzip")
  _one_line_error(_write(tmp_path / "bad.gz", gz[:10] + b"\xff" * 20 + gz[30:]),
                  "truncated or corrupt gzip")


def test_unreadable_file_is_a_data_error(tmp_path):
  with pytest.raises(sources.DataError, match="cannot read .*missing"):
    idx.read_idx(str(tmp_path / "missing"))


# ---- the idx data set -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_end_to_end(tmp_path, gz):
  arrays = _idx_dir(tmp_path / "d", gz=gz)
  ds = sources.load_dataset(_config("idx", tmp_path / "d"))
  assert ds.name == "idx:d" and ds.num_classes == 3 and ds.channels == 1
  assert ds.image_size == (28, 28)
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(ds.train_labels, arrays["train"][1])
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test"][0])
  np.testing.assert_array_equal(ds.test_labels, arrays["test"][1])
  assert ds.train_labels.dtype == np.int32 and ds.pretrain_images is ds.train_images


def test_idx_emnist_names_and_choosing_a_set(tmp_path):
  folder = tmp_path / "emnist"
  _idx_dir(folder, classes=4, prefix=("emnist-digits-train", "emnist-digits-test"))
  ds = sources.load_dataset(_config("idx", folder))
  assert ds.name == "idx:emnist-digits" and ds.num_classes == 4
  _idx_dir(folder, classes=5, prefix=("emnist-mnist-train", "emnist-mnist-test"), seed=1)
  with pytest.raises(sources.DataError, match="2 IDX sets .*emnist-digits, emnist-mnist.*"
                     "--config.data_dir=DIR/SET"):
    sources.load_dataset(_config("idx", folder))
  ds = sources.load_dataset(_config("idx", folder / "emnist-mnist"))
  assert ds.num_classes == 5


def test_idx_missing_files_are_named(tmp_path):
  _idx_dir(tmp_path / "d")
  os.remove(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(sources.DatasetUnavailableError, match="lacks the test labels IDX file"):
    sources.load_dataset(_config("idx", tmp_path / "d"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(sources.DatasetUnavailableError, match="No IDX files found"):
    sources.load_dataset(_config("idx", tmp_path / "empty"))
  with pytest.raises(sources.DatasetUnavailableError, match="not found"):
    sources.load_dataset(_config("idx", tmp_path / "nowhere"))


def test_idx_label_count_mismatch(tmp_path):
  _idx_dir(tmp_path / "d", gz=False)
  _write(tmp_path / "d" / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(19, np.uint8)))
  with pytest.raises(sources.DataError, match="19 labels for the 20 images"):
    sources.load_dataset(_config("idx", tmp_path / "d"))


def test_idx_needs_data_dir_in_config_check():
  c = _config("idx", "")
  with pytest.raises(config_check.ConfigError, match="--config.data_dir=PATH"):
    config_check.validate(c, 1)


# ---- fashion_mnist ----------------------------------------------------------------------------


def test_fashion_mnist_rejects_other_sizes(tmp_path):
  _idx_dir(tmp_path / "d")
  with pytest.raises(sources.DataError, match="not Fashion-MNIST.*--config.dataset=idx"):
    sources.load_dataset(_config("fashion_mnist", tmp_path / "d"))


def test_fashion_mnist_without_files_or_tfds_says_how(tmp_path):
  def no_tfds(config):
    raise sources.DatasetUnavailableError("Dataset 'fashion_mnist' is not available: none.\nmore")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(sources.DatasetUnavailableError) as e:
    idx.load_fashion_mnist(_config("fashion_mnist", tmp_path / "empty"), no_tfds)
  message = str(e.value)
  assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
  assert f"--config.data_dir={FASHION}" in message and "tfds build fashion_mnist" in message


def test_fashion_mnist_reads_tfds_when_no_idx_files(tmp_path):
  arrays = {s: (np.zeros(FASHION_MNIST_SHAPE[s], np.uint8), np.arange(n) % 10)
            for s, n in (("train", 60000), ("test", 10000))}
  def fake_tfds(config):
    return sources.ImageDataset(
        "fashion_mnist", arrays["train"][0], arrays["train"][0],
        arrays["train"][1].astype(np.int32), arrays["test"][0],
        arrays["test"][1].astype(np.int32), 10)
  ds = idx.load_fashion_mnist(_config("fashion_mnist", ""), fake_tfds)
  assert ds.train_images.shape == (60000, 28, 28, 1)


@pytest.mark.skipif(not os.path.isdir(FASHION),
                    reason=f"{FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
  ds = sources.load_dataset(_config("fashion_mnist", FASHION))
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  assert 0 < ds.train_images.mean() < 255
  as_idx = sources.load_dataset(_config("idx", FASHION, max_train_examples=1000))
  assert as_idx.train_images.shape == (1000, 28, 28, 1) and as_idx.num_classes == 10


# ---- data.max_train_examples ------------------------------------------------------------------


def test_max_train_examples_is_a_seeded_subset(tmp_path):
  arrays = _idx_dir(tmp_path / "d", n_train=30, classes=5)
  images, labels = arrays["train"]
  ds = sources.load_dataset(_config("idx", tmp_path / "d", max_train_examples=7))
  assert len(ds.pretrain_images) == 7 and ds.pretrain_images is ds.train_images
  assert len(ds.test_images) == 10                               # the test set stays whole
  for image, label in zip(ds.train_images[..., 0], ds.train_labels):
    row = np.flatnonzero((images == image).all(axis=(1, 2)))
    assert len(row) == 1 and labels[row[0]] == label
  again = sources.load_dataset(_config("idx", tmp_path / "d", max_train_examples=7))
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  other = sources.load_dataset(_config("idx", tmp_path / "d", max_train_examples=7,
                                       split_seed=1))
  assert not np.array_equal(other.train_images, ds.train_images)
  whole = sources.load_dataset(_config("idx", tmp_path / "d", max_train_examples=30))
  np.testing.assert_array_equal(whole.train_images[..., 0], images)


def test_max_train_examples_range_is_checked():
  c = config_base.get_base_config()
  c.data.max_train_examples = -1
  with pytest.raises(config_check.ConfigError, match="data.max_train_examples=-1 must be an "
                     "integer >= 0"):
    config_check.validate(c, 1)


# ---- configs/fashion_mnist.py -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["", "tiny", "cmc", "oucl_only", "moco,tiny", "simclr"])
def test_fashion_mnist_config_variants_validate(variant):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  c = fashion_mnist.get_config(variant)
  config_check.validate(c, 1)
  assert c.dataset == "fashion_mnist" and c.data.input_size == 28
  with pytest.raises(ValueError, match="unknown fashion_mnist config argument 'nope'"):
    fashion_mnist.get_config("nope")
