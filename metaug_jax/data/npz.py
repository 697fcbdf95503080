"""Images (and optional labels) from the user's .npz files, with one-line fixes for bad arrays."""

import math
import os
import zipfile
from typing import Optional

import numpy as np

from metaug_jax.data.dataset import (DataError, DatasetUnavailableError, ImageDataset,
                                     check_class_ids, labelled_split, one_line)


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
                    f"{one_line(e)}); {how}.") from e


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


def load(config) -> ImageDataset:
  """Images (and optional labels) from an .npz file; optional separate test .npz."""
  path, test_file = _npz_files(config.data_dir, config.data.test_file)
  x, y = _read_npz(path)
  name = f"npz:{os.path.basename(path)}"
  if not test_file:
    if y is None:
      return ImageDataset(name=name, pretrain_images=x, train_images=x, train_labels=None,
                          test_images=None, test_labels=None, num_classes=None)
    num_classes = check_class_ids(y, path, "y = np.unique(y, return_inverse=True)[1]")
    return labelled_split(name, x, y.astype(np.int32), num_classes, config)
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
