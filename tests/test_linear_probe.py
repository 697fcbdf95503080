"""Linear probe: learns what is linearly separable, not random labels; the paper's augmented
protocol draws fresh, key-determined views of the training set."""

import os
import sys

import jax
import numpy as np

from metaug_jax import train
from metaug_jax.evaluation import features, linear_probe, probes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402


def test_probe_separates_separable_features_and_not_random_labels():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 32)) * 3
  y = rng.integers(0, 4, size=400)
  x = centres[y] + rng.normal(size=(400, 32))
  yt = rng.integers(0, 4, size=200)
  xt = centres[yt] + rng.normal(size=(200, 32))
  good = linear_probe.probe(x, y, xt, yt, 4, epochs=20, lr=0.1, batch_size=64)
  assert good["test_acc"] > 95 and good["dim"] == 32
  shuffled = linear_probe.probe(x, rng.permutation(y), xt, yt, 4, epochs=20, lr=0.1,
                                batch_size=64)
  assert shuffled["test_acc"] < 45                       # chance is 25%


def test_augmented_protocol_uses_fresh_keyed_views():
  config = digits.get_config("tiny")
  config.num_devices = 1
  config.eval.probe_augment = True
  config.eval.probe_epochs = 2
  # Only the full-label probe follows the augmented protocol; the others are tested elsewhere.
  config.eval.few_label_fractions, config.eval.val_fraction, config.eval.knn_levels = (), 0.0, ()
  exp = train.build_experiment(config)
  state = jax.device_get(exp.init_state())
  images = exp.dataset.train_images[:40]
  extractor = features.method_extractor(exp.method, config.data, 16, exp.devices)
  extract = lambda keys=None: extractor(state.params, state.batch_stats, images, keys=keys)
  keys = lambda seed: features.example_keys(jax.random.PRNGKey(seed), len(images))
  a, b = extract(keys(3)), extract(keys(3))
  np.testing.assert_array_equal(a["fc"], b["fc"])         # same key, same views
  assert not np.allclose(a["fc"], extract()["fc"])        # augmented != eval views
  assert not np.allclose(a["fc"], extract(keys(4))["fc"])
  results = probes.evaluate(exp.method, state.params, state.batch_stats, exp.dataset, config,
                            exp.devices)
  assert {"conv", "fc"} <= set(results["linear"]) and results["protocol"]["probe_augment"]
  for r in results["linear"].values():
    assert r["augmented"] and 0.0 <= r["test_acc"] <= 100.0 and r["best_test_acc"] >= r["test_acc"]
