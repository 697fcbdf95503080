"""The one feature-extraction path (metaug_jax/evaluation/features.py): mapped over 4 simulated
devices it equals a direct single-device apply, for eval views and keyed training views; the
last batch is padded; parameters are arguments (one trace); a feature function's collectives
see the whole batch."""

import os
import sys

import jax
import numpy as np
import pytest

from metaug_jax import train
from metaug_jax.data import views as views_lib
from metaug_jax.evaluation import features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402  (configs/digits.py)

N = 37            # not a multiple of any batch below: the last batch is padded


@pytest.fixture(scope="module")
def cmc():
  """(experiment, host state, N images) of tiny CMC (two encoders, no MAG: cheap to apply)."""
  exp = train.build_experiment(digits.get_config("cmc,tiny"))
  assert len(exp.devices) == 4
  return exp, jax.device_get(exp.init_state()), exp.dataset.train_images[:N]


def direct(exp, state, images, keys=None):
  """method.features of all images in one single-device call: the reference."""
  data = exp.config.data

  @jax.jit
  def apply(params, stats, images, keys):
    views = (views_lib.make_eval_views(images, data) if keys is None
             else views_lib.make_train_views_from_keys(keys, images, data))
    return exp.method.features(params, stats, views)

  return jax.device_get(apply(state.params, state.batch_stats, images, keys))


def assert_features_close(got: dict, want: dict, tol: float = 1e-5):
  assert set(got) == set(want)
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == np.float32, k
    np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


def test_four_devices_equal_one_direct_apply_for_eval_and_keyed_views(cmc):
  exp, state, images = cmc
  four = features.method_extractor(exp.method, exp.config.data, 10, exp.devices)
  assert (four.per_device, four.batch_size) == (3, 12)          # rounded up to the devices
  assert_features_close(four(state.params, state.batch_stats, images),
                        direct(exp, state, images))
  keys = features.example_keys(jax.random.PRNGKey(5), N)
  assert keys.shape == (N, 2) and keys.dtype == np.uint32
  keyed = four(state.params, state.batch_stats, images, keys=keys)
  assert_features_close(keyed, direct(exp, state, images, keys))
  # An example's views depend on its key alone: 1 device and another batch size agree.
  one = features.method_extractor(exp.method, exp.config.data, 16, exp.devices[:1])
  assert_features_close(one(state.params, state.batch_stats, images, keys=keys), keyed)
  assert not np.allclose(keyed["fc"], four(state.params, state.batch_stats, images)["fc"])


def test_parameters_are_arguments_traced_once_and_names_filter(cmc):
  exp, state, images = cmc
  traces = []

  def counted(params, stats, views):
    traces.append(1)
    return exp.method.features(params, stats, views)

  extract = features.Extractor(counted, exp.config.data, 16, exp.devices,
                               names=("fc", "missing"))
  first = extract(state.params, state.batch_stats, images)
  shifted = jax.tree.map(lambda p: p + 0.1, state.params)
  second = extract(shifted, state.batch_stats, images)
  assert len(traces) == 1 and set(first) == {"fc"}
  assert not np.allclose(first["fc"], second["fc"])              # new parameters were used
  with pytest.raises(ValueError, match="no images"):
    extract(state.params, state.batch_stats, images[:0])


def test_a_feature_function_s_batch_norm_sees_the_whole_batch_on_any_device_count(cmc):
  """fmnist_diagnostics' train-mode BatchNorm: statistics synced over the extractor's device
  axis are those of the whole batch, so 4 devices give what 1 device gives."""
  import fmnist_diagnostics  # pylint: disable=g-import-not-at-top  (experiments/)
  exp, state, images = cmc
  fn = fmnist_diagnostics.feature_fn(exp.method, train_mode_bn=True)
  four = features.Extractor(fn, exp.config.data, 16, exp.devices)
  one = features.Extractor(fn, exp.config.data, 16, exp.devices[:1])
  got = four(state.params, state.batch_stats, images)
  assert got["conv"].shape[:2] == (N, 2)                         # (N, views, F)
  # Batch statistics summed across devices round differently (up to ~3e-4 seen on fc).
  assert_features_close(got, one(state.params, state.batch_stats, images), tol=2e-3)
  # Each device's own 4 images' statistics (what an unsynced BatchNorm would use) differ.
  per_device = features.Extractor(fn, exp.config.data, 4, exp.devices[:1])
  assert np.abs(got["fc"] - per_device(state.params, state.batch_stats, images)["fc"]).max() > 0.1
  eval_bn = features.Extractor(fmnist_diagnostics.feature_fn(exp.method, False),
                               exp.config.data, 16, exp.devices)
  assert not np.allclose(got["fc"], eval_bn(state.params, state.batch_stats, images)["fc"])


def test_split_views_and_pixel_features():
  z = np.arange(12.0).reshape(2, 6)
  np.testing.assert_array_equal(features.split_views(z, 3)[1], [[2, 3], [8, 9]])
  with pytest.raises(ValueError, match="do not split into 4 views"):
    features.split_views(z, 4)
  images = np.array([[[[0], [255]], [[51], [102]]]], np.uint8)    # (1, 2, 2, 1)
  np.testing.assert_allclose(features.pixel_features(images), [[0.0, 1.0, 0.2, 0.4]])
