"""Tiny ImageNet (200 classes, 64x64 RGB) from its extracted archive folder."""

import os

import numpy as np

from metaug_jax.data import image_files
from metaug_jax.data.dataset import DataError, DatasetUnavailableError, ImageDataset

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _layout_message(data_dir: str, problem: str) -> str:
  return (f"Tiny ImageNet not found: {problem}\n"
          f"Expected --config.data_dir={data_dir or 'DIR'} to hold the extracted archive "
          f"({URL}):\n"
          f"  DIR/train/<wnid>/images/*.JPEG\n"
          f"  DIR/val/images/*.JPEG and DIR/val/val_annotations.txt "
          f"(or DIR/val/<wnid>/images/*, or DIR/val/<wnid>/*)")


def load(config) -> ImageDataset:
  """Tiny ImageNet (200 classes, 64x64 RGB) from its extracted folder: train and val splits."""
  data_dir = config.data_dir
  train_dir = os.path.join(data_dir, "train")
  val_dir = os.path.join(data_dir, "val")
  if not data_dir or not os.path.isdir(train_dir):
    raise DatasetUnavailableError(_layout_message(
        data_dir, f"no train/ folder in {data_dir!r}."))
  classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
  if not classes:
    raise DatasetUnavailableError(_layout_message(
        data_dir, f"{train_dir} has no class folders."))
  class_index = {c: i for i, c in enumerate(classes)}
  train_paths, train_labels = [], []
  for c in classes:
    folder = os.path.join(train_dir, c, "images")
    folder = folder if os.path.isdir(folder) else os.path.join(train_dir, c)
    paths = image_files.list_images(folder, recursive=False)
    train_paths += paths
    train_labels += [class_index[c]] * len(paths)
  if not train_paths:
    raise DatasetUnavailableError(_layout_message(
        data_dir, f"no images under {train_dir}/<wnid>/images/."))
  val_paths, val_labels = _val_split(val_dir, class_index, data_dir)
  size_wh = (64, 64)
  train_images = image_files.read_images(train_paths, "RGB", size_wh)
  val_images = image_files.read_images(val_paths, "RGB", size_wh)
  return ImageDataset(
      name="tiny_imagenet", pretrain_images=train_images, train_images=train_images,
      train_labels=np.asarray(train_labels, np.int32), test_images=val_images,
      test_labels=np.asarray(val_labels, np.int32), num_classes=len(classes))


def _val_split(val_dir: str, class_index: dict, data_dir: str):
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
      files = image_files.list_images(sub if os.path.isdir(sub) else folder, recursive=False)
      paths += files
      labels += [class_index[c]] * len(files)
  if not paths:
    raise DatasetUnavailableError(_layout_message(
        data_dir, f"no labelled validation images in {val_dir}."))
  return paths, labels
