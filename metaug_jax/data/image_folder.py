"""The user's own images: an ImageFolder (class sub-folders, labelled) or a flat folder."""

import logging
import os
from typing import Optional

import numpy as np

from metaug_jax.data import image_files
from metaug_jax.data.dataset import DataError, DatasetUnavailableError, ImageDataset, labelled_split


def _scan_split(folder: str) -> tuple[list[str], Optional[list[str]], Optional[list[str]]]:
  """(paths, class names of each path or None, sorted classes or None) of one split folder.

  Sub-folders holding images make it an ImageFolder (labelled); else its image files are an
  unlabelled flat folder.
  """
  subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                   and not d.startswith("."))
  class_paths = {d: image_files.list_images(os.path.join(folder, d), recursive=True)
                 for d in subdirs}
  classes = [d for d in subdirs if class_paths[d]]
  if classes:
    paths, names = [], []
    for c in classes:
      paths += class_paths[c]
      names += [c] * len(class_paths[c])
    return paths, names, classes
  return image_files.list_images(folder, recursive=False), None, None


def _no_images_message(folder: str) -> str:
  """One line for a folder without image files: what it holds instead and what is read."""
  names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
  more = f" and {len(names) - 3} more" if len(names) > 3 else ""
  held = f"it holds only {', '.join(names[:3])}{more}" if names else "it is empty"
  return (f"No images found in {folder} ({held}); the folder loader reads "
          f"{', '.join(image_files.IMAGE_EXTENSIONS)} files in DIR/<class>/ (labelled) or DIR/ "
          f"(unlabelled).")


def load(config) -> ImageDataset:
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
  mode, size_wh = image_files.common_format(train_paths + test_paths, size)
  images = image_files.read_images(train_paths, mode, size_wh)
  name = f"folder:{os.path.basename(os.path.normpath(root))}"
  if classes is None:
    return ImageDataset(name=name, pretrain_images=images, train_images=images,
                        train_labels=None, test_images=None, test_labels=None, num_classes=None)
  class_index = {c: i for i, c in enumerate(classes)}
  labels = np.asarray([class_index[c] for c in train_names], np.int32)
  if not test_paths:
    return labelled_split(name, images, labels, len(classes), config)
  unknown = sorted(set(test_names) - set(class_index))
  if unknown:
    raise DataError(f"{test_dir} has classes {unknown} that {train_dir} lacks.")
  test_images = image_files.read_images(test_paths, mode, size_wh)
  test_labels = np.asarray([class_index[c] for c in test_names], np.int32)
  return ImageDataset(name=name, pretrain_images=images, train_images=images,
                      train_labels=labels, test_images=test_images, test_labels=test_labels,
                      num_classes=len(classes))
