"""Tests of dataset loading (metaug_jax.data.sources) and host batching (metaug_jax.data.loader)."""

import io
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from metaug_jax import config_base
from metaug_jax.data import loader
from metaug_jax.data import sources
from metaug_jax.data import tfds_source


def _config(dataset, data_dir="", **data):
  c = config_base.get_base_config()
  c.dataset = dataset
  c.data_dir = str(data_dir)
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def _rand_images(n, h, w, c, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


# ---- digits ------------------------------------------------------------------------------


def test_digits_shapes_classes_and_deterministic_split():
  ds = sources.load_dataset(_config("digits", test_fraction=0.2, split_seed=0))
  assert ds.name == "digits" and ds.num_classes == 10
  assert ds.train_images.dtype == np.uint8 and ds.train_images.shape[1:] == (8, 8, 1)
  assert ds.pretrain_images is ds.train_images
  assert len(ds.train_images) + len(ds.test_images) == 1797
  assert len(ds.test_images) == 360
  assert ds.train_labels.dtype == np.int32 and set(ds.train_labels) == set(range(10))
  assert ds.train_images.max() == 255 and ds.channels == 1 and ds.image_size == (8, 8)
  # Stratified: every class keeps about 20% of its examples in the test set.
  counts = np.bincount(ds.test_labels, minlength=10)
  assert counts.min() >= 34 and counts.max() <= 38
  again = sources.load_dataset(_config("digits", test_fraction=0.2, split_seed=0))
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  np.testing.assert_array_equal(again.test_labels, ds.test_labels)
  other = sources.load_dataset(_config("digits", test_fraction=0.2, split_seed=1))
  assert not np.array_equal(other.test_images, ds.test_images)


def test_digits_pixel_scaling():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits().images
  ds = sources.load_dataset(_config("digits", test_fraction=0.0))
  assert ds.test_images is None and len(ds.train_images) == 1797
  all_pixels = np.sort(np.unique(ds.train_images))
  np.testing.assert_array_equal(all_pixels, np.unique(np.round(raw * 255 / 16)).astype(np.uint8))


def test_unknown_dataset_names_allowed_values():
  with pytest.raises(ValueError, match="cifar_archive"):
    sources.load_dataset(_config("mnist"))


# ---- npz ---------------------------------------------------------------------------------


def test_npz_labelled_grey_split(tmp_path):
  x = _rand_images(50, 6, 5, 1)[..., 0]  # N x H x W
  y = np.arange(50) % 5
  np.savez(tmp_path / "d.npz", x=x, y=y)
  ds = sources.load_dataset(_config("npz", tmp_path / "d.npz", test_fraction=0.2))
  assert ds.train_images.shape == (40, 6, 5, 1) and ds.test_images.shape == (10, 6, 5, 1)
  assert ds.num_classes == 5 and ds.train_labels.dtype == np.int32
  # Rows keep their labels through the split.
  rows = {x[i].tobytes(): y[i] for i in range(50)}
  for img, label in zip(ds.test_images, ds.test_labels):
    assert rows[img[..., 0].tobytes()] == label


def test_npz_unlabelled_colour_and_test_file(tmp_path):
  np.savez(tmp_path / "u.npz", x=_rand_images(12, 4, 4, 3))
  ds = sources.load_dataset(_config("npz", tmp_path / "u.npz"))
  assert ds.train_labels is None and ds.test_images is None and ds.channels == 3
  assert len(ds.pretrain_images) == 12
  np.savez(tmp_path / "tr.npz", x=_rand_images(12, 4, 4, 3), y=np.arange(12) % 3)
  np.savez(tmp_path / "te.npz", x=_rand_images(6, 4, 4, 3, seed=1), y=np.arange(6) % 4)
  ds = sources.load_dataset(_config("npz", tmp_path / "tr.npz",
                                    test_file=str(tmp_path / "te.npz")))
  assert len(ds.train_images) == 12 and len(ds.test_images) == 6 and ds.num_classes == 4


def test_npz_validation_errors(tmp_path):
  np.savez(tmp_path / "f.npz", x=np.random.rand(4, 5, 5, 3).astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    sources.load_dataset(_config("npz", tmp_path / "f.npz"))
  np.savez(tmp_path / "chw.npz", x=_rand_images(4, 3, 8, 8))
  with pytest.raises(ValueError, match="channels-first"):
    sources.load_dataset(_config("npz", tmp_path / "chw.npz"))
  np.savez(tmp_path / "y.npz", x=_rand_images(4, 5, 5, 1), y=np.arange(3))
  with pytest.raises(ValueError, match="'y'"):
    sources.load_dataset(_config("npz", tmp_path / "y.npz"))
  with pytest.raises(sources.DatasetUnavailableError, match="not found"):
    sources.load_dataset(_config("npz", tmp_path / "missing.npz"))


# ---- folder ------------------------------------------------------------------------------


def test_folder_labelled_grey_image_folder(tmp_path):
  images = _rand_images(10, 6, 6, 1)
  for i in range(10):
    _save(str(tmp_path / ("b" if i % 2 else "a") / f"{i}.png"), images[i])
  ds = sources.load_dataset(_config("folder", tmp_path, test_fraction=0.2))
  assert ds.num_classes == 2 and ds.channels == 1 and ds.image_size == (6, 6)
  assert len(ds.train_images) == 8 and len(ds.test_images) == 2
  rows = {images[i].tobytes(): i % 2 for i in range(10)}  # class "a" -> 0, "b" -> 1
  for img, label in zip(np.concatenate([ds.train_images, ds.test_images]),
                        np.concatenate([ds.train_labels, ds.test_labels])):
    assert rows[img.tobytes()] == label


def test_folder_flat_unlabelled_colour_resizes_to_common_size(tmp_path):
  for i in range(3):
    _save(str(tmp_path / f"{i}.png"), _rand_images(1, 5, 7, 3, seed=i)[0])
  _save(str(tmp_path / "odd.png"), _rand_images(1, 9, 9, 1)[0])  # grey and another size
  ds = sources.load_dataset(_config("folder", tmp_path))
  assert ds.train_labels is None and ds.test_images is None and ds.num_classes is None
  assert ds.pretrain_images.shape == (4, 5, 7, 3)  # RGB since not all are grey; H=5, W=7
  c = _config("folder", tmp_path)
  c.data.folder_image_size = 4
  assert sources.load_dataset(c).pretrain_images.shape == (4, 4, 4, 3)


def test_folder_train_test_subfolders(tmp_path):
  for split, n in (("train", 4), ("val", 2)):
    for cls in ("cat", "dog"):
      for i in range(n):
        _save(str(tmp_path / split / cls / f"{i}.jpg"), _rand_images(1, 8, 8, 3, seed=i)[0])
  ds = sources.load_dataset(_config("folder", tmp_path))
  assert len(ds.train_images) == 8 and len(ds.test_images) == 4
  np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1])


def test_folder_errors_name_the_problem(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="No images"):
    sources.load_dataset(_config("folder", tmp_path / "empty"))
  bad = tmp_path / "bad"
  _save(str(bad / "ok.png"), _rand_images(1, 4, 4, 3)[0])
  (bad / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png"):
    sources.load_dataset(_config("folder", bad))
  with pytest.raises(sources.DatasetUnavailableError):
    sources.load_dataset(_config("folder", tmp_path / "nope"))


# ---- CIFAR pickle archive ----------------------------------------------------------------


def _cifar_pickle(data, labels, label_key):
  return pickle.dumps({b"data": data, label_key: labels, b"batch_label": b"x"}, protocol=2)


def _fake_cifar10_files(n_per_batch=3):
  files, batches = {}, []
  for b in range(1, 6):
    data = _rand_images(n_per_batch, 3, 32, 32, seed=b).reshape(n_per_batch, -1)  # CHW rows
    labels = [(b + i) % 10 for i in range(n_per_batch)]
    files[f"data_batch_{b}"] = _cifar_pickle(data, labels, b"labels")
    batches.append((data, labels))
  test = _rand_images(4, 3, 32, 32, seed=9).reshape(4, -1)
  files["test_batch"] = _cifar_pickle(test, [1, 2, 3, 4], b"labels")
  files["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]})
  return files, batches


def test_cifar10_archive_tar_and_folder(tmp_path):
  files, batches = _fake_cifar10_files()
  tar_path = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(tar_path, "w:gz") as tar:
    for name, blob in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  folder = tmp_path / "extracted" / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  for name, blob in files.items():
    (folder / name).write_bytes(blob)
  for path in (tar_path, folder, tmp_path / "extracted"):
    ds = sources.load_dataset(_config("cifar_archive", path))
    assert ds.num_classes == 10 and ds.train_images.shape == (15, 32, 32, 3)
    assert ds.test_images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(ds.test_labels, [1, 2, 3, 4])
    # Row layout: 1024 R, then 1024 G, then 1024 B values, each row-major.
    first = batches[0][0][0]
    assert ds.train_images[0, 2, 5, 1] == first[1024 + 2 * 32 + 5]
    assert ds.train_labels[3] == batches[1][1][0]


def test_cifar100_archive_folder(tmp_path):
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  (folder / "train").write_bytes(_cifar_pickle(_rand_images(5, 3, 32, 32).reshape(5, -1),
                                               [0, 99, 5, 5, 7], b"fine_labels"))
  (folder / "test").write_bytes(_cifar_pickle(_rand_images(2, 3, 32, 32).reshape(2, -1),
                                              [3, 4], b"fine_labels"))
  ds = sources.load_dataset(_config("cifar_archive", tmp_path))
  assert ds.num_classes == 100 and len(ds.train_images) == 5
  np.testing.assert_array_equal(ds.train_labels, [0, 99, 5, 5, 7])
  with pytest.raises(sources.DatasetUnavailableError, match="cifar-10-python.tar.gz"):
    sources.load_dataset(_config("cifar_archive", tmp_path / "missing"))


# ---- tiny imagenet -----------------------------------------------------------------------


def test_tiny_imagenet_standard_layout(tmp_path):
  wnids = ["n02", "n01"]
  for c, wnid in enumerate(sorted(wnids)):
    for i in range(3):
      _save(str(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"),
            np.full((64, 64, 3), 40 * c + i, np.uint8))
  lines = []
  for i, wnid in enumerate(["n02", "n01", "n02"]):
    _save(str(tmp_path / "val" / "images" / f"val_{i}.JPEG"), _rand_images(1, 64, 64, 3)[0])
    lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
  # A greyscale JPEG, as some Tiny ImageNet files are: loaded as RGB.
  _save(str(tmp_path / "val" / "images" / "val_3.JPEG"), _rand_images(1, 64, 64, 1)[0])
  lines.append("val_3.JPEG\tn01\t0\t0\t1\t1")
  (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  ds = sources.load_dataset(_config("tiny_imagenet", tmp_path))
  assert ds.num_classes == 2 and ds.train_images.shape == (6, 64, 64, 3)
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(ds.test_labels, [1, 0, 1, 0])
  assert abs(int(ds.train_images[4, 10, 10, 0]) - 41) <= 2  # JPEG is lossy


def test_tiny_imagenet_class_folder_val_and_missing(tmp_path):
  for wnid in ("n1", "n2"):
    _save(str(tmp_path / "train" / wnid / "images" / "a.JPEG"), _rand_images(1, 64, 64, 3)[0])
    _save(str(tmp_path / "val" / wnid / "b.JPEG"), _rand_images(1, 64, 64, 3)[0])
  ds = sources.load_dataset(_config("tiny_imagenet", tmp_path))
  np.testing.assert_array_equal(ds.test_labels, [0, 1])
  with pytest.raises(sources.DatasetUnavailableError, match="tiny-imagenet-200.zip"):
    sources.load_dataset(_config("tiny_imagenet", tmp_path / "nowhere"))


# ---- tensorflow-datasets -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_tfds_offline_unprepared_fails_fast(tmp_path, name):
  start = time.monotonic()
  with pytest.raises(sources.DatasetUnavailableError) as info:
    sources.load_dataset(_config(name, tmp_path / "tfds"))
  assert time.monotonic() - start < 20.0
  message = str(info.value)
  assert "data_dir" in message and "tfds build" in message and name in message
  assert str(tmp_path / "tfds") in message and "array_record" in message


def test_tfds_download_without_tensorflow_says_how_to_install(tmp_path):
  if tfds_source.tensorflow_available():
    pytest.skip("tensorflow is installed: download would try the network")
  c = _config("cifar10", tmp_path / "tfds")
  c.download = True
  start = time.monotonic()
  with pytest.raises(sources.DatasetUnavailableError, match=r"metaug-jax\[prepare\]"):
    sources.load_dataset(c)
  assert time.monotonic() - start < 20.0


def test_tfds_mock_data_source_without_tensorflow(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = sources.load_dataset(_config("cifar10", tmp_path / "tfds"))
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (6, 32, 32, 3) and ds.num_classes == 10
    assert ds.train_labels.dtype == np.int32
    stl = sources.load_dataset(_config("stl10", tmp_path / "tfds"))
    assert stl.pretrain_images.shape == (12, 96, 96, 3) and len(stl.train_images) == 6
    stl_train = sources.load_dataset(_config("stl10", tmp_path / "tfds",
                                             stl10_pretrain_split="train"))
    assert stl_train.pretrain_images is stl_train.train_images
    with pytest.raises(ValueError, match="stl10_pretrain_split"):
      sources.load_dataset(_config("stl10", tmp_path / "tfds", stl10_pretrain_split="all"))


# ---- EpochLoader -------------------------------------------------------------------------


def _indexed_images(n, h=2, w=2):
  """Images whose pixels encode their row (n <= 256), so batches can be checked."""
  return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                         (n, h, w, 1)).copy()


def test_epoch_loader_shapes_and_index():
  images = _indexed_images(50)
  ld = loader.EpochLoader(images, global_batch_size=12, num_devices=4, seed=0)
  assert ld.steps_per_epoch == 4
  batch = ld.batch_at(0)
  assert batch["image"].shape == (4, 3, 2, 2, 1) and batch["image"].dtype == np.uint8
  assert batch["index"].shape == (4, 3) and batch["index"].dtype == np.int32
  np.testing.assert_array_equal(batch["image"][..., 0, 0, 0], batch["index"])


def test_epoch_loader_each_example_once_per_epoch_and_reshuffles():
  ld = loader.EpochLoader(_indexed_images(48), global_batch_size=8, num_devices=2, seed=3)
  epochs = []
  for e in range(2):
    idx = np.concatenate([ld.batch_at(e * 6 + s)["index"].ravel() for s in range(6)])
    assert sorted(idx.tolist()) == list(range(48))
    epochs.append(idx)
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[0], np.random.default_rng([3, 0]).permutation(48))


def test_epoch_loader_drops_remainder():
  ld = loader.EpochLoader(_indexed_images(50), global_batch_size=8, num_devices=1, seed=0)
  idx = np.concatenate([ld.batch_at(s)["index"].ravel() for s in range(ld.steps_per_epoch)])
  assert len(idx) == 48 and len(set(idx.tolist())) == 48


def test_epoch_loader_resume_gives_same_batches():
  images = _indexed_images(30)
  make = lambda: loader.EpochLoader(images, global_batch_size=4, num_devices=2, seed=5)
  it = make().iterate(0)
  straight = [next(it) for _ in range(20)]
  resumed = make().iterate(13)
  for step in range(13, 20):
    got = next(resumed)
    np.testing.assert_array_equal(got["index"], straight[step]["index"])
    np.testing.assert_array_equal(got["image"], straight[step]["image"])
  assert not np.array_equal(straight[0]["index"], straight[7]["index"])


@pytest.mark.parametrize("devices,processes", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_epoch_loader_global_batch_is_split_consistently(devices, processes):
  images = _indexed_images(40)
  single = loader.EpochLoader(images, global_batch_size=8, num_devices=1, seed=1)
  for step in (0, 3, 9):
    whole = single.batch_at(step)["index"].ravel()
    parts = [loader.EpochLoader(images, global_batch_size=8, num_devices=devices, seed=1,
                                process_index=p, process_count=processes).batch_at(step)
             for p in range(processes)]
    b = 8 // (devices * processes)
    for p, part in enumerate(parts):
      assert part["index"].shape == (devices, b)
      for d in range(devices):
        row = (p * devices + d) * b
        np.testing.assert_array_equal(part["index"][d], whole[row:row + b])
    np.testing.assert_array_equal(np.concatenate([q["index"].ravel() for q in parts]), whole)


def test_uniform_order_draws_each_step_afresh_and_resumes():
  images = _indexed_images(40)
  make = lambda seed: loader.EpochLoader(images, global_batch_size=8, num_devices=2, seed=seed,
                                         order="uniform")
  ld = make(4)
  batches = [ld.global_indices_at(s) for s in range(12)]
  for idx in batches:  # no repeat inside a batch, rows of the data set only
    assert len(set(idx.tolist())) == 8 and idx.min() >= 0 and idx.max() < 40
  # Steps are independent draws, not slices of one permutation: some row comes back within
  # what would be one epoch (5 steps), which a permutation never allows.
  first_epoch = np.concatenate(batches[:5])
  assert len(set(first_epoch.tolist())) < 40
  np.testing.assert_array_equal(make(4).global_indices_at(7), batches[7])  # pure in (seed, step)
  assert not np.array_equal(make(5).global_indices_at(7), batches[7])
  np.testing.assert_array_equal(make(4).batch_at(9)["index"].ravel(), batches[9])


def test_epoch_loader_validation():
  with pytest.raises(ValueError, match="order"):
    loader.EpochLoader(_indexed_images(40), global_batch_size=8, num_devices=1, seed=0,
                       order="random")
  with pytest.raises(ValueError, match="multiple"):
    loader.EpochLoader(_indexed_images(40), global_batch_size=6, num_devices=4, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    loader.EpochLoader(_indexed_images(10), global_batch_size=16, num_devices=1, seed=0)


# ---- prefetch ----------------------------------------------------------------------------


def test_prefetch_preserves_order_and_ends():
  with loader.prefetch(iter(range(20)), 3) as it:
    assert list(it) == list(range(20))


def test_prefetch_propagates_producer_exceptions():
  def source():
    yield 1
    yield 2
    raise RuntimeError("boom in producer")
  it = loader.prefetch(source(), 2)
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(RuntimeError, match="boom in producer"):
    next(it)
  it.close()


def test_prefetch_close_stops_infinite_producer():
  ld = loader.EpochLoader(_indexed_images(16), global_batch_size=4, num_devices=1, seed=0)
  it = loader.prefetch(ld.iterate(0), 2)
  first = next(it)
  np.testing.assert_array_equal(first["index"], ld.batch_at(0)["index"])
  np.testing.assert_array_equal(next(it)["index"], ld.batch_at(1)["index"])
  it.close()
  assert not it._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(it)


# ---- user-data errors: one-line DataErrors naming the fix --------------------------------


def _data_error(config) -> str:
  """The message of the DataError that loading `config` raises; it must be one line."""
  with pytest.raises(sources.DataError) as info:
    sources.load_dataset(config)
  message = str(info.value)
  assert "\n" not in message, message
  return message


@pytest.mark.parametrize("x,needle", [
    (np.random.default_rng(0).random((4, 5, 5)).astype(np.float32),
     "np.round(x * 255).astype(np.uint8)"),
    (np.full((4, 5, 5), 200, np.int64), "x = np.round(x).astype(np.uint8)"),
    (_rand_images(4, 3, 8, 8), "x.transpose(0, 2, 3, 1)"),
    (_rand_images(4, 8, 8, 4), "x[..., :3]"),
    (_rand_images(4, 8, 8, 2), "x[..., :1]"),
    (np.zeros((0, 8, 8), np.uint8), "holds no images"),
])
def test_npz_image_problems_are_one_line_with_the_conversion(tmp_path, x, needle):
  np.savez(tmp_path / "d.npz", x=x)
  assert needle in _data_error(_config("npz", tmp_path / "d.npz"))


def test_npz_without_x_or_not_an_archive(tmp_path):
  np.savez(tmp_path / "d.npz", images=_rand_images(4, 5, 5, 1))
  assert "has no 'x' array (it holds ['images'])" in _data_error(_config("npz", tmp_path / "d.npz"))
  np.save(tmp_path / "a.npy", _rand_images(4, 5, 5, 1))
  os.rename(tmp_path / "a.npy", tmp_path / "a.npz")
  assert "single .npy array" in _data_error(_config("npz", tmp_path / "a.npz"))
  (tmp_path / "t.npz").write_text("not numpy")
  assert "cannot read" in _data_error(_config("npz", tmp_path / "t.npz"))


def test_npz_labels_must_be_every_class_id_from_zero(tmp_path):
  x = _rand_images(40, 8, 8, 1)
  np.savez(tmp_path / "gap.npz", x=x, y=np.array([0, 1000000] * 20))
  message = _data_error(_config("npz", tmp_path / "gap.npz"))
  assert "missing 1..999999" in message and "np.unique(y, return_inverse=True)[1]" in message
  np.savez(tmp_path / "neg.npz", x=x, y=np.array([-1, 0] * 20))
  assert "negative" in _data_error(_config("npz", tmp_path / "neg.npz"))
  np.savez(tmp_path / "float.npz", x=x, y=np.array([0.0, 1.0] * 20))
  assert "y.astype(np.int64)" in _data_error(_config("npz", tmp_path / "float.npz"))
  # The union of train and test labels counts: 0, 2 in train and 1 in test is fine ...
  np.savez(tmp_path / "tr.npz", x=x, y=np.array([0, 2] * 20))
  np.savez(tmp_path / "te.npz", x=x[:4], y=np.array([1] * 4))
  ds = sources.load_dataset(_config("npz", tmp_path / "tr.npz", test_file=str(tmp_path / "te.npz")))
  assert ds.num_classes == 3
  # ... but 0, 2 in train and 5 in test is not.
  np.savez(tmp_path / "te.npz", x=x[:4], y=np.array([5] * 4))
  message = _data_error(_config("npz", tmp_path / "tr.npz", test_file=str(tmp_path / "te.npz")))
  assert "missing 1, 3..4" in message and "y_test" in message


def test_npz_data_dir_may_be_a_folder_with_one_file_or_a_train_test_pair(tmp_path):
  x, y = _rand_images(20, 6, 6, 1), np.arange(20) % 2
  one = tmp_path / "one"
  one.mkdir()
  np.savez(one / "mine.npz", x=x, y=y)
  ds = sources.load_dataset(_config("npz", one))
  assert ds.name == "npz:mine.npz" and len(ds.train_images) == 16
  pair = tmp_path / "pair"
  pair.mkdir()
  np.savez(pair / "train.npz", x=x, y=y)
  np.savez(pair / "test.npz", x=x[:6], y=y[:6])
  ds = sources.load_dataset(_config("npz", pair))
  assert len(ds.train_images) == 20 and len(ds.test_images) == 6
  np.savez(pair / "extra.npz", x=x, y=y)
  message = _data_error(_config("npz", pair))
  assert "holds 3 .npz files (extra.npz, test.npz, train.npz)" in message
  (tmp_path / "none").mkdir()
  assert "holds 0 .npz files" in _data_error(_config("npz", tmp_path / "none"))


def test_folder_problems_are_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  assert "(it is empty)" in _data_error(_config("folder", tmp_path / "empty"))
  text = tmp_path / "text"
  text.mkdir()
  (text / "notes.txt").write_text("hello")
  assert "it holds only notes.txt" in _data_error(_config("folder", text))
  bad = tmp_path / "bad"
  _save(str(bad / "ok.png"), _rand_images(1, 4, 4, 3)[0])
  (bad / "broken.png").write_bytes(b"not a png")
  message = _data_error(_config("folder", bad))
  assert "broken.png" in message and "replace or remove" in message


def test_unreadable_files_are_one_line_data_errors(tmp_path, monkeypatch):
  for i in range(4):
    _save(str(tmp_path / "a" / f"{i}.png"), _rand_images(1, 4, 4, 1)[0])
  _save(str(tmp_path / "b" / "0.png"), _rand_images(1, 4, 4, 1)[0])
  denied = lambda path: PermissionError(13, "Permission denied", str(path))
  real_listdir, real_scandir = os.listdir, os.scandir

  def listdir(path):
    if os.path.abspath(path) == str(tmp_path):
      raise denied(path)
    return real_listdir(path)

  def scandir(path):                                   # os.walk lists folders with scandir
    if os.path.abspath(path) == str(tmp_path / "b"):
      raise denied(path)
    return real_scandir(path)

  with monkeypatch.context() as m:
    m.setattr(os, "listdir", listdir)
    message = _data_error(_config("folder", tmp_path))
  assert f"cannot read {tmp_path}: Permission denied" in message and "chmod" in message
  monkeypatch.setattr(os, "scandir", scandir)          # an unreadable class is not skipped
  assert f"cannot read {tmp_path / 'b'}" in _data_error(_config("folder", tmp_path))


def test_too_few_examples_for_the_test_split_is_a_data_error(tmp_path):
  np.savez(tmp_path / "d.npz", x=_rand_images(1, 5, 5, 1), y=np.array([0]))
  assert "too few" in _data_error(_config("npz", tmp_path / "d.npz"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_npz_file_is_a_data_error(tmp_path):
  np.savez(tmp_path / "d.npz", x=_rand_images(4, 5, 5, 1))
  os.chmod(tmp_path / "d.npz", 0)
  assert "Permission denied" in _data_error(_config("npz", tmp_path / "d.npz"))
