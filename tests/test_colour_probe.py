"""The colour-prediction probe: labels are the bins of the copies' strength difference, the
copies are the single jitter ops at those strengths, a colour-keeping feature beats a
colour-blind one on synthetic colour data, and grey data get one line instead of a failure."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import config_base
from metaug_jax.data import augment
from metaug_jax.evaluation import colour_probe


def test_difference_bins_by_hand():
  t1 = jnp.asarray([-1.0, 0.0, 0.5, 0.3, 1.0, -0.35])
  t2 = jnp.asarray([1.0, 0.0, 0.13, -0.95, -1.0, 0.05])
  # d = (t2 - t1) / 2 = 1, 0, -0.185, -0.625, -1, 0.2; bin = floor((d + 1) / 2 * 10)
  np.testing.assert_array_equal(colour_probe.difference_bins(t1, t2), [9, 5, 4, 1, 0, 6])


def test_sampled_strengths_and_labels_against_a_hand_computation():
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(4000))
  t1, t2, labels = jax.vmap(colour_probe.sample_strengths)(keys)
  t1, t2, labels = np.asarray(t1, np.float64), np.asarray(t2, np.float64), np.asarray(labels)
  assert np.all(np.abs(t1) <= 1) and np.all(np.abs(t2) <= 1)
  d = (t2 - t1) / 2
  np.testing.assert_array_equal(labels, np.clip(np.floor((d + 1) / 2 * 10), 0, 9))
  counts = np.bincount(labels, minlength=10) / labels.size
  assert np.all(np.abs(counts - 0.1) < 0.025), counts      # uniform bins: chance is 10%
  # The mean strength m is spread out (var E[(1 - |d|)^2] / 3 = 1/9), so one copy's strength
  # is not a function of the label.
  np.testing.assert_allclose(np.var((t1 + t2) / 2), 1 / 9, rtol=0.1)


def test_copies_are_the_single_jitter_ops_at_their_strengths():
  images = np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  key = jax.random.PRNGKey(7)
  x1, x2, labels = colour_probe.jittered_pairs(key, images, chunk=2)
  assert x1.dtype == x2.dtype == np.uint8 and x1.shape == images.shape and labels.shape == (4,)

  @jax.jit
  def by_hand(i, image):
    t1, t2, label = colour_probe.sample_strengths(jax.random.fold_in(key, i))
    x = image.astype(jnp.float32) / 255
    def jitter(t):
      f = 1 + 0.4 * t
      return augment.adjust_hue(augment.adjust_saturation(augment.adjust_contrast(
          augment.adjust_brightness(x, f), f), f), 0.1 * t)
    return jitter(t1), jitter(t2), label

  for i in range(4):
    want1, want2, label = by_hand(i, images[i])
    assert int(label) == labels[i]
    np.testing.assert_allclose(x1[i], np.round(np.asarray(want1) * 255), atol=1)
    np.testing.assert_allclose(x2[i], np.round(np.asarray(want2) * 255), atol=1)
  # Strength 0 is the identity; example i does not depend on the chunks.
  same = colour_probe.jitter_at_strength(jnp.asarray(images[0], jnp.float32) / 255, 0.0,
                                         colour_probe.JITTER)
  np.testing.assert_allclose(same, images[0] / 255, atol=1e-6)
  whole = colour_probe.jittered_pairs(key, images, chunk=4)
  np.testing.assert_array_equal(whole[0], x1)


class _FixedFeatures:
  """A 'method' whose probe levels are fixed functions of the eval view: conv keeps colour
  (log of each channel's mean and spread), fc is colour-blind (the standardised grey image,
  which brightness, contrast and saturation leave unchanged)."""

  def features(self, params, stats, views):
    del params, stats
    x = views[0] * 0.5 + 0.5                               # back to [0, 1]
    colour = jnp.log(jnp.concatenate([jnp.mean(x, (1, 2)), jnp.std(x, (1, 2))], -1) + 1e-3)
    grey = augment.rgb_to_grey(x).reshape(x.shape[0], -1)
    grey = (grey - grey.mean(-1, keepdims=True)) / (grey.std(-1, keepdims=True) + 1e-3)
    return {"conv": colour, "fc": grey, "embedding": colour}


def _dataset(channels: int, n: int = 700, size: int = 8):
  """Smooth random images: a colour per image plus a shared spatial pattern with noise."""
  rng = np.random.RandomState(1)
  base = rng.uniform(0.2, 0.8, (n, 1, 1, channels))
  pattern = rng.uniform(-0.15, 0.15, (n, size, size, 1))
  images = np.clip((base + pattern) * 255, 0, 255).astype(np.uint8)
  return types.SimpleNamespace(name=f"synthetic{channels}", channels=channels,
                               pretrain_images=images, train_images=images[:500],
                               test_images=images[500:], train_labels=None, test_labels=None)


def _experiment(channels: int):
  config = config_base.get_base_config()
  config.dataset, config.method = "npz", "simclr"
  config.data.views, config.data.input_size = "simclr", 8
  config.eval.colour_probe = True
  config.eval.probe_epochs, config.eval.probe_batch_size = 30, 64
  config.eval.probe_weight_decay = 0.0
  return types.SimpleNamespace(config=config, dataset=_dataset(channels),
                               method=_FixedFeatures())


def test_a_colour_keeping_feature_beats_a_colour_blind_one(tmp_path, capsys):
  exp = _experiment(3)
  state = types.SimpleNamespace(params={}, batch_stats={}, step=jnp.asarray(12))
  results = colour_probe.run_if_enabled(exp, state, str(tmp_path))
  assert set(results) == {"conv", "fc"}          # the probe levels, not the kNN embedding
  keeps, blind = results["conv"]["test_acc"], results["fc"]["test_acc"]
  assert keeps > 35.0 and blind < 25.0, (keeps, blind)   # chance: about 10
  assert results["conv"]["dim"] == 2 * 6 and 8 < results["conv"]["chance"] < 20
  assert json.load(open(tmp_path / "colour_probe_step_12.json")) == results
  assert "| conv | 12 |" in capsys.readouterr().out


def test_grey_data_print_one_line_and_do_not_fail(tmp_path, capsys):
  exp = _experiment(1)
  state = types.SimpleNamespace(params={}, batch_stats={}, step=jnp.asarray(3))
  assert colour_probe.run_if_enabled(exp, state, str(tmp_path)) is None
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ["colour probe: does not apply: synthetic1 has 1-channel (grey) images, "
                 "which have no saturation or hue to jitter."]
  assert not list(tmp_path.iterdir())
  exp.config.eval.colour_probe = False            # off: silent, nothing computed
  assert colour_probe.run_if_enabled(exp, state, str(tmp_path)) is None
  assert capsys.readouterr().out == ""
  with pytest.raises(ValueError, match="does not apply"):
    colour_probe.evaluate(exp.method, {}, {}, exp.dataset, exp.config)


@pytest.mark.slow  # a 2-step training run, two class probes and two colour probes (~1 minute)
def test_training_and_restore_for_eval_run_the_probe_on_colour_data(tmp_path, capsys):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import digits  # pylint: disable=g-import-not-at-top  (configs/digits.py)
  from metaug_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from metaug_jax import train  # pylint: disable=g-import-not-at-top
  data = _dataset(3, n=120)
  np.savez(tmp_path / "rgb.npz", x=data.pretrain_images,
           y=np.random.RandomState(0).randint(0, 3, 120))
  c = digits.get_config("simsiam,tiny")
  c.dataset, c.data_dir, c.data.views = "npz", str(tmp_path / "rgb.npz"), "simclr"
  c.num_train_steps, c.batch_size, c.eval.probe_epochs = 2, 16, 2
  c.eval.monitor_every_steps, c.eval.plots = 0, False
  c.eval.colour_probe, c.eval.colour_probe_examples = True, 64
  run = tmp_path / "run"
  train.train_and_evaluate(c, str(run))
  assert "colour probe: 10-bin" in capsys.readouterr().out
  trained = json.load(open(run / "colour_probe_step_2.json"))
  assert set(trained) == {"conv", "fc"}
  os.remove(run / "colour_probe_step_2.json")
  eval_lib.evaluate_workdir(str(run), overrides={"eval.colour_probe": True})
  assert "colour probe: 10-bin" in capsys.readouterr().out
  assert json.load(open(run / "colour_probe_step_2.json")) == trained   # same seed and state
