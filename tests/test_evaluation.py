"""kNN evaluation, the online monitor, the PNG diagnostics and the restore-for-eval CLI
(damaged checkpoints skipped, the configured probe protocol, overrides without --config)."""

import json
import os
import subprocess
import sys

import ckpt_damage  # tests/ckpt_damage.py
import jax
import numpy as np
import pytest

from metaug_jax import checkpoint as ckpt_lib
from metaug_jax import cli
from metaug_jax import eval as eval_lib
from metaug_jax import train
from metaug_jax.evaluation import features, knn, monitor, plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402  (configs/digits.py)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- kNN -----------------------------------------------------------------------------------


def numpy_knn_predict(train_x, train_y, test_x, num_classes, k, temperature):
  """The InstDisc weighted kNN, written directly: the reference for knn.knn_predict."""
  a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  q = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  preds = []
  for sims in q @ a.T:
    top = np.argsort(-sims)[:k]
    votes = np.zeros(num_classes)
    for j in top:
      votes[train_y[j]] += np.exp(sims[j] / temperature)
    preds.append(int(np.argmax(votes)))
  return np.array(preds)


@pytest.mark.parametrize("k,temperature,chunk", [(7, 0.1, 32), (1, 0.07, 256), (20, 0.5, 5)])
def test_knn_matches_numpy(k, temperature, chunk):
  rng = np.random.default_rng(k)
  train_x = rng.normal(size=(200, 16)).astype(np.float32)
  train_y = rng.integers(0, 5, size=200)
  test_x = rng.normal(size=(77, 16)).astype(np.float32)  # 77: several chunks, last padded
  test_y = rng.integers(0, 5, size=77)
  expected = numpy_knn_predict(train_x, train_y, test_x, 5, k, temperature)
  got = np.asarray(knn.knn_predict(train_x, train_y, test_x, num_classes=5, k=k,
                                   temperature=temperature, chunk=chunk))
  np.testing.assert_array_equal(got, expected)
  acc = knn.knn_accuracy(train_x, train_y, test_x, test_y, 5, k, temperature, chunk)
  assert acc == pytest.approx(100.0 * np.mean(expected == test_y))


def test_knn_separable_is_perfect_and_clips_k():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 8) * 10.0
  train_y = np.repeat(np.arange(4), 10)
  test_y = np.repeat(np.arange(4), 3)
  train_x = centres[train_y] + rng.normal(size=(40, 8))
  test_x = centres[test_y] + rng.normal(size=(12, 8))
  assert knn.knn_accuracy(train_x, train_y, test_x, test_y, 4, k=5, temperature=0.07) == 100.0
  # k larger than the memory uses every example; small T: the nearest ones dominate the vote.
  assert knn.knn_accuracy(train_x, train_y, test_x, test_y, 4, k=1000, temperature=0.01) == 100.0


# ---- a tiny digits experiment and a checkpoint of it -----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(experiment, its initial state, a workdir holding that state as a checkpoint).

  An untrained state keeps the tests fast (no train-step compilation); random conv features
  already classify digits well above chance.
  """
  config = digits.get_config("tiny")
  exp = train.build_experiment(config)
  state = jax.device_get(exp.init_state())
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  ckpt = ckpt_lib.Checkpointer(workdir)
  ckpt.save(int(state.step), state, config)
  ckpt.close()
  return exp, state, workdir


def test_monitor_knn_and_score_histograms(tiny, tmp_path):
  exp, state, _ = tiny
  mon = monitor.Monitor.maybe_create(exp, str(tmp_path))
  assert mon is not None and mon.due(3) and not mon.due(4)   # tiny: every 3 steps
  assert mon.due(0) and mon.due(4, final_step=4)
  before = jax.tree.map(np.array, state)
  out = mon.run(3, state)
  out_again = mon.run(6, state)
  assert 0.0 <= out["knn_acc"] <= 100.0
  assert out["knn_acc"] > 30.0          # 10 digit classes: random conv features beat chance
  assert -1.0 <= out["monitor_neg_mean"] <= 1.0 and -1.0 <= out["monitor_pos_mean"] <= 1.0
  assert out == out_again               # fixed subsets and augmentation keys
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, state))
  records = [json.loads(l) for l in open(tmp_path / monitor.SCORE_HIST_FILE)]
  assert [r["step"] for r in records] == [3, 6]
  pairs = exp.config.eval.monitor_examples            # 64 images, all in the memory subset
  assert len(records[0]["bin_edges"]) == monitor.HIST_BINS + 1
  assert sum(records[0]["pos_counts"]) == pairs
  assert sum(records[0]["neg_counts"]) == pairs * (pairs - 1)
  assert records[0]["knn_acc"] == out["knn_acc"]


def test_monitor_disabled_without_steps_or_labels(tiny):
  exp, _, _ = tiny
  config = exp.config.copy_and_resolve_references()
  config.eval.monitor_every_steps = 0
  import dataclasses
  assert monitor.Monitor.maybe_create(dataclasses.replace(exp, config=config)) is None
  unlabelled = dataclasses.replace(exp.dataset, train_labels=None, test_images=None,
                                   test_labels=None, num_classes=None)
  assert monitor.Monitor.maybe_create(dataclasses.replace(exp, dataset=unlabelled)) is None


# ---- plots ---------------------------------------------------------------------------------


def assert_png(path, min_bytes=5000):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE, path
  assert len(data) > min_bytes, (path, len(data))


def write_synthetic_run(workdir):
  """metrics.jsonl (with a re-logged step and a truncated line), score_hist.jsonl, npz."""
  rng = np.random.default_rng(0)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in list(range(10, 110, 10)) + [100]:
      f.write(json.dumps({"step": step, "loss_total": 5 - step / 50, "oucl": 4 - step / 60,
                          "oucl_aug": 8 - step / 40, "margin": 1e-3 * step, "pos_mean": 0.5,
                          "neg_mean": 0.1, "mag_grad_direct_norm": 1.0 / step,
                          "mag_grad_second_order_norm": 1e-4 / step, "grad_norm": 2.0,
                          "steps_per_sec": 3.0}) + "\n")
    f.write('{"step": 110, "loss_to')  # a killed run's last line
  edges = np.linspace(-1, 1, 51)
  with open(os.path.join(workdir, monitor.SCORE_HIST_FILE), "w") as f:
    for i, step in enumerate((0, 50, 100)):
      pos = np.histogram(np.clip(rng.normal(0.3 + 0.2 * i, 0.15, 500), -1, 1), edges)[0]
      neg = np.histogram(np.clip(rng.normal(0.1 - 0.05 * i, 0.2, 5000), -1, 1), edges)[0]
      f.write(json.dumps({"step": step, "bin_edges": edges.tolist(),
                          "pos_counts": pos.tolist(), "neg_counts": neg.tolist(),
                          "knn_acc": 40.0 + 20 * i}) + "\n")
  labels = np.repeat(np.arange(10), 30)
  xy = rng.normal(size=(300, 2)) + 6 * np.stack([np.cos(labels), np.sin(labels)], 1)
  plots.save_embedding(workdir, xy, labels, "synthetic t-SNE")


def test_write_all_draws_every_plot_from_files(tmp_path):
  write_synthetic_run(str(tmp_path))
  written = plots.write_all(str(tmp_path))
  assert sorted(os.path.basename(p) for p in written) == sorted(
      [plots.CURVES_PNG, plots.SCORE_HIST_PNG, plots.EMBEDDING_PNG])
  for path in written:
    assert_png(path)
  series = plots.metric_series(plots.read_jsonl(str(tmp_path / "metrics.jsonl")))
  assert list(series["oucl"][0]) == list(range(10, 110, 10))   # re-logged step kept once


def test_curves_draw_a_method_s_own_metrics_without_a_panel_entry():
  steps = np.arange(3)
  series = {k: (steps, np.ones(3)) for k in ("loss", "target_decay", "pos_mean", "pos_std",
                                             "steps_per_sec", "monitor_pos_mean")}
  titles = [title for title, _, _ in plots.curve_panels(series)]
  assert "loss" in titles and "target_decay" in titles      # a BYOL metric, no entry needed
  assert "pos_std" not in titles and "steps_per_sec" not in titles


def test_write_all_is_robust_to_missing_and_broken_files(tmp_path):
  assert plots.write_all(str(tmp_path)) == []                   # nothing logged yet
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
  (tmp_path / plots.EMBEDDING_FILE).write_text("not an npz")
  written = plots.write_all(str(tmp_path))                      # the broken npz is logged
  assert [os.path.basename(p) for p in written] == [plots.CURVES_PNG]
  assert plots.write_diagnostics(None, None, str(tmp_path)) == []  # never raises


def test_write_diagnostics_on_a_real_state(tiny, tmp_path):
  exp, state, _ = tiny
  mon = monitor.Monitor(exp, str(tmp_path))
  mon.run(2, state)
  written = plots.write_diagnostics(exp, state, str(tmp_path))
  # No metrics.jsonl here: curves.png shows only the monitor's kNN accuracy.
  assert {os.path.basename(p) for p in written} == {plots.CURVES_PNG, plots.SCORE_HIST_PNG,
                                                    plots.EMBEDDING_PNG}
  with np.load(tmp_path / plots.EMBEDDING_FILE) as data:
    n = min(exp.config.eval.tsne_max_points, exp.dataset.test_images.shape[0])
    assert data["xy"].shape == (n, 2) and data["labels"].shape == (n,)
  for path in written:
    assert_png(path)


# ---- restore for eval ------------------------------------------------------------------------


def test_evaluate_workdir_prints_every_probe(tiny, capsys):
  _, state, workdir = tiny
  results = eval_lib.evaluate_workdir(workdir)
  out = capsys.readouterr().out
  for column in ("| all labels |", "| 1 % labels | 10 % labels |", "| val-selected (epoch) |",
                 "| kNN (k=20, T=0.07) |"):
    assert column in out
  assert "| conv |" in out and "| mag_hidden |" in out and "| embedding |" in out
  assert set(results["linear"]) == set(results["few_label"]) == set(results["val_selected"]) \
      == {"conv", "fc", "mag_hidden"}
  assert set(results["knn"]) == {"embedding", "fc"}
  assert set(results["few_label"]["fc"]) == {"0.01", "0.1"}
  assert len(results["few_label"]["fc"]["0.1"]["accs"]) == exp_draws(tiny)
  assert 0.0 <= results["knn"]["embedding"]["test_acc"] <= 100.0
  with open(os.path.join(workdir, f"eval_step_{int(state.step)}.json")) as f:
    assert json.load(f)["knn"]["embedding"]["k"] == 20


def exp_draws(tiny) -> int:
  return int(tiny[0].config.eval.few_label_draws)


def test_evaluate_workdir_with_a_different_config_is_a_one_line_error(tiny):
  _, _, workdir = tiny
  config = digits.get_config("tiny")
  config.model.width = 1.0
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="config.model.width") as err:
    eval_lib.evaluate_workdir(workdir, config)
  assert "\n" not in str(err.value)


def test_evaluate_workdir_leaves_out_training_xla_settings(tiny):
  """Reading the checkpoint starts JAX's backend, so eval must not apply training's XLA flags
  (a lean run's xla_cse=False / memory scheduler was a ConfigError here before)."""
  _, _, workdir = tiny
  config = digits.get_config("tiny")
  config.xla_cse, config.xla_cpu_scheduler = False, "memory"
  flags_before = os.environ.get("XLA_FLAGS")
  results = eval_lib.evaluate_workdir(workdir, config)
  assert {"conv", "fc"} <= set(results["linear"]) and results["knn"]
  assert os.environ.get("XLA_FLAGS") == flags_before


def test_eval_cli_reports_a_config_mismatch_in_one_line(tiny):
  _, _, workdir = tiny
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "metaug_jax.eval", f"--workdir={workdir}",
                      "--config=configs/digits.py:tiny", "--config.model.embedding_dim=64"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "config.model.embedding_dim: checkpoint has 128, config has 64" in errors[0]
  assert "leave out --config" in errors[0]


# ---- restore for eval: damaged checkpoints, the probe protocol, overrides without --config ---

@pytest.fixture(scope="module")
def three_steps(tiny, tmp_path_factory):
  """A workdir with tiny's initial state saved as steps 2, 4 and 6 (copy before damaging)."""
  exp, state, _ = tiny
  workdir = str(tmp_path_factory.mktemp("three_steps"))
  ckpt = ckpt_lib.Checkpointer(workdir)
  for step in (2, 4, 6):
    ckpt.save(step, state.replace(step=np.int32(step)), exp.config)
  ckpt.close()
  return workdir


def _eval_cli(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "metaug_jax.eval", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_evaluate_workdir_skips_a_damaged_newest_checkpoint(three_steps, tmp_path, capsys):
  copy = ckpt_damage.copy_workdir(three_steps, tmp_path / "w")
  ckpt_damage.truncate_largest_file(copy, 6)
  results = eval_lib.evaluate_workdir(copy)     # the tiny config's probes: compiled already
  out, err = capsys.readouterr()
  [warning] = [l for l in err.splitlines() if l.strip()]
  assert warning.startswith("warning: skipping the checkpoint at step 6 (truncated or "
                            "unreadable state: ") and warning.endswith("; evaluating step 4")
  assert "step 4)" in out and {"conv", "fc"} <= set(results["linear"]) and results["knn"]
  assert os.path.exists(os.path.join(copy, "eval_step_4.json"))
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["2", "4", "6"]  # read only


def test_evaluate_workdir_at_a_damaged_step_or_over_only_damaged_ones_is_one_line(
    three_steps, tmp_path):
  copy = ckpt_damage.copy_workdir(three_steps, tmp_path / "w")
  ckpt_damage.delete_metadata(copy, 6)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as err:
    eval_lib.evaluate_workdir(copy, step=6)
  assert "\n" not in str(err.value) and "step 6" in str(err.value)
  assert "missing or unreadable config" in str(err.value) and "--step" in str(err.value)
  assert isinstance(err.value, cli.USER_ERRORS)
  for step in (2, 4):
    ckpt_damage.truncate_largest_file(copy, step)
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="every checkpoint") as err:
    eval_lib.evaluate_workdir(copy)
  assert "\n" not in str(err.value)


def test_evaluate_workdir_probes_by_the_configured_protocol(tiny, monkeypatch):
  """eval.probe_augment: the full-label probe's training features are fresh augmented views
  each epoch, through probes.evaluate, as training's final probe; the other probes reuse the
  eval-view features extracted once per split."""
  _, _, workdir = tiny
  calls = []
  extract = features.Extractor.__call__

  def spy(self, params, batch_stats, images, keys=None):
    calls.append(None if keys is None else np.asarray(keys).tolist())
    return extract(self, params, batch_stats, images, keys=keys)

  monkeypatch.setattr(features.Extractor, "__call__", spy)
  config = digits.get_config("tiny")
  config.eval.probe_augment = True
  config.eval.probe_epochs = 2
  config.eval.few_label_fractions, config.eval.val_fraction = (), 0.0   # test_probes' part
  results = eval_lib.evaluate_workdir(workdir, config)
  assert calls[:2] == [None, None]                    # train and test eval views, once each
  keyed = calls[2:]
  assert len(keyed) == 2 and keyed[0] != keyed[1]    # one fresh set of views per epoch
  assert results["linear"]["conv"]["augmented"] and results["linear"]["fc"]["augmented"]
  assert results["knn"]["embedding"] and not results["few_label"] \
      and not results["val_selected"]


def test_evaluate_workdir_puts_overrides_on_the_saved_config(tiny):
  _, _, workdir = tiny
  results = eval_lib.evaluate_workdir(workdir, overrides={"eval.random_init": True})
  with open(os.path.join(workdir, "probe_random_init.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
    eval_lib.evaluate_workdir(workdir, overrides={"model.width": 1.0})
  message = str(err.value)
  assert "\n" not in message and "config.model.width: checkpoint has 0.5" in message
  assert "drop those --config overrides" in message


@pytest.mark.slow
def test_eval_cli_overrides_without_config(tiny):
  _, _, workdir = tiny
  # Every probe but the full-label one and the kNN switched off from the command line.
  only = ("--config.eval.few_label_fractions=()", "--config.eval.val_fraction=0")
  r = _eval_cli(f"--workdir={workdir}", "--config.eval.random_init=True", *only)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "randomly initialised encoder" in r.stdout
  r = _eval_cli(f"--workdir={workdir}", "--config.eval.probe_epochs=2", *only)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| conv |" in r.stdout and "Traceback" not in r.stderr and "| kNN (k=" in r.stdout
  assert "% labels" not in r.stdout and "val-selected" not in r.stdout
  r = _eval_cli(f"--workdir={workdir}", "--config.model.width=1.0")
  assert r.returncode == 2
  [line] = [l for l in r.stderr.splitlines() if l.strip()]
  assert line.startswith("error: ") and "config.model.width" in line


def test_eval_cli_at_a_damaged_step_is_one_line_and_exit_2(three_steps, tmp_path):
  copy = ckpt_damage.copy_workdir(three_steps, tmp_path / "w")
  ckpt_damage.truncate_largest_file(copy, 6)
  r = _eval_cli(f"--workdir={copy}", "--step=6")
  assert r.returncode == 2, r.stderr[-3000:]
  [line] = [l for l in r.stderr.splitlines() if l.strip()]
  assert line.startswith("error: the checkpoint at step 6 ") and "damaged" in line
