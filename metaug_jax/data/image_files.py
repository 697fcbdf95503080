"""Image files on disk: listing, header reads and parallel decoding to uint8 arrays (PIL)."""

import collections
import concurrent.futures
import os
from typing import Sequence

import numpy as np

from metaug_jax.data.dataset import DataError, one_line, os_error_message

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _is_image_file(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(path).startswith(".")


def _raise(error: Exception):
  """os.walk's onerror: an unreadable folder is an error, not a folder silently skipped."""
  raise error


def list_images(folder: str, recursive: bool) -> list[str]:
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
    return os_error_message(error)
  return (f"Cannot read image {path} ({type(error).__name__}: {one_line(error)}); "
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


def read_images(paths: Sequence[str], mode: str, size_wh: tuple[int, int]) -> np.ndarray:
  """Decodes files into one uint8 (N, H, W, C) array, in parallel threads (PIL frees the GIL)."""
  channels = 1 if mode == "L" else 3
  out = np.empty((len(paths), size_wh[1], size_wh[0], channels), np.uint8)
  def read_into(i):
    out[i] = _read_image(paths[i], mode, size_wh)
  workers = min(16, (os.cpu_count() or 1) + 4)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(read_into, range(len(paths))))
  return out


def common_format(paths: Sequence[str], size: int) -> tuple[str, tuple[int, int]]:
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
