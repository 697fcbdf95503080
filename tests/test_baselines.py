"""The paper's baselines as methods: MoCo v2, BYOL, SimSiam, Barlow Twins and the debiased /
hard-negative losses of SimCLR, CMC and MoCo. Each trains, its EMA / queue semantics hold on
a 3-step toy run, and 4 simulated devices give the same parameters as one."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import config_check, parallel, train
from metaug_jax.methods import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402  (configs/digits.py)

SIAMESE = ("moco", "byol", "simsiam", "barlow_twins")


def tiny(method: str, **overrides):
  c = digits.get_config(f"{method},tiny")
  c.batch_size = 16
  c.bank.num_negatives = 16
  c.moco.queue_size = 96
  c.byol.predictor_hidden = 32
  c.update_from_flattened_dict(overrides)
  return c


def run(config, num_devices: int, steps: int):
  """(experiment, states before each step and after the last, metrics of each step)."""
  config = config.copy_and_resolve_references()
  config.num_devices = num_devices
  exp = train.build_experiment(config)
  state = exp.init_state()
  step_fn = parallel.pmap_step(exp.method.train_step, exp.devices, donate=False)
  states, metrics = [jax.device_get(state)], []
  for s in range(steps):
    state, m = step_fn(state, exp.loader.batch_at(s))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return exp, states, metrics


def max_diff(a, b) -> float:
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(flat_a, flat_b) if np.asarray(x).size)


def test_every_table1_row_is_a_registered_method_with_paper_numbers():
  labels = [row.label for _, row in registry.table1_rows()]
  assert sorted(labels) == sorted([
      "SimCLR", "CMC", "MoCo", "BYOL", "Barlow Twins", "SimCLR + Debiased", "SimCLR + Hard",
      "CMC + Debiased", "CMC + Hard", "MetAug (only OUCL)", "MetAug"])
  for _, row in registry.table1_rows():
    assert set(row.numbers) == set(registry.TABLE1_DATASETS)
  # Other papers' rows name their source and no Table 1 dataset.
  for spec in registry.specs().values():
    for row in spec.paper_rows:
      if row.source != registry.TABLE1_SOURCE:
        assert not set(row.numbers) & set(registry.TABLE1_DATASETS), row


@pytest.mark.parametrize("method", SIAMESE)
def test_variant_trains_on_four_devices_like_on_one(method):
  config = tiny(method)
  config_check.validate(config, 4)
  _, one, m1 = run(config, 1, 2)
  _, four, m4 = run(config, 4, 2)
  assert all(np.isfinite(float(v)) for m in m4 for v in m.values())
  for part in four[-1].params:                     # every online and target part moves
    assert max_diff(four[0].params[part], four[-1].params[part]) > 0, part
  # Float rounding (1e-7) grows with the size of a step's update: Barlow Twins' summed loss
  # takes steps of norm ~2 at the digits learning rate.
  step = max(1.0, max_diff(one[0].params, one[1].params))
  assert max_diff(one[-1].params, four[-1].params) < 2e-5 * step
  if one[-1].banks is not None:
    assert max_diff(one[-1].banks, four[-1].banks) < 2e-5 * step
  np.testing.assert_allclose(m1[-1]["loss"], m4[-1]["loss"], rtol=1e-4)


def test_moco_key_encoder_follows_the_query_encoder_and_the_queue_takes_its_keys():
  config = tiny("moco")
  exp, states, _ = run(config, 1, 3)
  m, size = config.moco.momentum, config.moco.queue_size
  g = config.batch_size
  for s in range(3):
    old, new = states[s], states[s + 1]
    want = jax.tree.map(lambda k, q: m * k + (1 - m) * q, old.params["key_encoder"],
                        old.params["encoder"])
    assert max_diff(want, new.params["key_encoder"]) < 1e-6
    # Both views' keys of this step, written at the old pointer (mod K), nothing else moved.
    def key_embeddings(images):
      views = exp.method.views(old, {"image": images})
      outs = exp.method.encoder.apply(
          {"params": new.params["key_encoder"], "batch_stats": old.batch_stats["key_encoder"]},
          views, train=True, mutable=["batch_stats"])[0]
      return jnp.concatenate([outs[1]["embedding"], outs[0]["embedding"]])

    keys = jax.vmap(key_embeddings, axis_name=parallel.AXIS)(
        exp.loader.batch_at(s)["image"])[0]
    rows = (int(old.banks.ptr) + np.arange(2 * g)) % size
    np.testing.assert_allclose(np.asarray(new.banks.keys)[rows], keys, atol=2e-5)
    untouched = np.setdiff1d(np.arange(size), rows)
    np.testing.assert_array_equal(np.asarray(new.banks.keys)[untouched],
                                  np.asarray(old.banks.keys)[untouched])
    assert int(new.banks.ptr) == (int(old.banks.ptr) + 2 * g) % size


def test_byol_target_is_the_cosine_scheduled_average_of_the_online_encoder():
  config = tiny("byol", **{"byol.base_decay": 0.9})
  _, states, metrics = run(config, 1, 3)
  total = config.num_train_steps
  for s in range(3):
    tau = 1 - (1 - 0.9) * (np.cos(np.pi * s / total) + 1) / 2
    np.testing.assert_allclose(metrics[s]["target_decay"], tau, rtol=1e-6)
    old, new = states[s], states[s + 1]
    want = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, old.params["target"],
                        new.params["encoder"])
    assert max_diff(want, new.params["target"]) < 1e-6
  # The predictor is trained, the target never receives gradient steps of its own.
  assert "target" not in states[-1].opt_state and "predictor" in states[-1].opt_state


@functools.lru_cache(maxsize=None)
def _plain_step(method: str):
  """The state after one step with plain InfoNCE (shared by the negatives cases)."""
  return run(tiny(method), 1, 1)[1][-1]


@pytest.mark.parametrize("method,negatives", [("simclr", "debiased"), ("simclr", "hard"),
                                              ("cmc", "debiased"), ("cmc", "hard"),
                                              ("moco", "debiased"), ("moco", "hard")])
def test_negative_options_train_and_change_the_step(method, negatives):
  plain = _plain_step(method)
  _, other, metrics = run(tiny(method, **{"loss.negatives": negatives}), 1, 1)
  assert np.isfinite(float(metrics[0]["loss"]))
  assert max_diff(plain.params["encoder"], other[-1].params["encoder"]) > 1e-7


def test_siamese_methods_refuse_configs_they_cannot_train():
  config = tiny("byol")
  config.model.share_encoder = False
  with pytest.raises(config_check.ConfigError, match="share_encoder=True"):
    config_check.validate(config, 1)
  config = tiny("moco")
  config.moco.queue_size = 8
  with pytest.raises(config_check.ConfigError, match="queue_size=8"):
    config_check.validate(config, 1)


@pytest.mark.slow  # a CLI run in a subprocess (~30 s)
def test_cli_trains_a_baseline_from_its_config_variant(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT,
                                                                  os.environ.get("PYTHONPATH")])))
  r = subprocess.run([sys.executable, "-m", "metaug_jax.main",
                      "--config=configs/digits.py:simsiam,tiny", "--config.eval.plots=False",
                      f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "simsiam" in r.stdout and "| fc |" in r.stdout
