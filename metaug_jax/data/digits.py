"""scikit-learn's bundled 8x8 digits: the quick-start dataset, no download."""

import numpy as np

from metaug_jax.data.dataset import ImageDataset, labelled_split


def load(config) -> ImageDataset:
  """scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255), seeded stratified split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  return labelled_split("digits", images, labels, 10, config)
