"""The loop: multi-device == single-device, resume == uninterrupted, clear CLI errors; safe
long runs: damaged checkpoints skipped, SIGTERM saves, no NaN checkpoint, plain progress."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import ckpt_damage  # tests/ckpt_damage.py
import jax
import numpy as np
import pytest

from metaug_jax import checkpoint as ckpt_lib
from metaug_jax import cli, finite_guard, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402  (configs/digits.py)


def tiny_config(method: str, **overrides):
  c = digits.get_config("tiny")
  c.method = method
  c.model.share_encoder = method == "simclr"
  c.batch_size = 16
  c.bank.num_negatives = 16
  c.metaug.lambda_aug = 0.1            # make the MAG terms matter for the comparison
  c.metaug.lambda_mi = 0.1
  c.metaug.inner_lr = 0.1
  c.update_from_flattened_dict(overrides)
  return c


def run_steps(config, num_devices: int, steps: int):
  config = config.copy_and_resolve_references()
  config.num_devices = num_devices
  exp = train.build_experiment(config)
  state = exp.init_state()
  step_fn = parallel.pmap_step(exp.method.train_step, exp.devices)
  metrics = None
  for s in range(steps):
    state, metrics = step_fn(state, exp.loader.batch_at(s))
  return jax.device_get(state), jax.device_get(metrics)


def assert_trees_close(a, b, atol):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(flat_a, flat_b) if np.asarray(x).size)
  assert worst <= atol, worst


# The variants beyond one per step family compile two more MetAug steps each: slow.
_VARIANT = pytest.mark.slow
@pytest.mark.parametrize("method,overrides", [
    ("simclr", {}), ("cmc", {}), pytest.param("metaug_oucl_only", {}, marks=_VARIANT),
    ("metaug", {}),
    pytest.param("metaug", {"metaug.algorithm": "legacy"}, marks=_VARIANT),
    pytest.param("metaug", {"metaug.virtual_step_from": "current",
                            "bank.schedule": "code_exact"}, marks=_VARIANT),
    pytest.param("metaug", {"metaug.virtual_step_from": "current",
                            "metaug.meta_gradient": "reverse"}, marks=_VARIANT)])
def test_four_devices_match_one_device(method, overrides):
  config = tiny_config(method, **overrides)
  # The legacy encoder look-ahead at this test's large inner step amplifies any 1e-7
  # difference ~1e5-fold per step (a 1e-7 perturbation of the initial weights gives 1e-2 after
  # one step on one device), so float reassociation across devices can only be compared
  # after its first step.
  steps = 1 if overrides.get("metaug.algorithm") == "legacy" else 3
  one, m1 = run_steps(config, 1, steps)
  four, m4 = run_steps(config, 4, steps)
  assert_trees_close(one.params, four.params, atol=2e-5)
  assert_trees_close(one.batch_stats, four.batch_stats, atol=2e-5)
  if one.banks is not None:
    assert_trees_close(one.banks, four.banks, atol=2e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  # The step actually trained something.
  fresh = jax.device_get(train.build_experiment(config).init_state())
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), fresh.params, one.params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_encoder_bank_init_holds_the_initial_encoders_embeddings():
  config = tiny_config("cmc", **{"bank.init": "encoder", "data.max_train_examples": 64})
  exp = train.build_experiment(config)
  state = jax.device_get(exp.init_state())
  random_banks = jax.device_get(train.build_experiment(tiny_config("cmc")).init_state().banks)
  views = train.views_lib.make_eval_views(exp.dataset.pretrain_images, config.data)
  embedding = np.asarray(exp.method.features(state.params, state.batch_stats, views)["embedding"])
  assert state.banks.shape == (2, 64, config.model.embedding_dim)
  np.testing.assert_allclose(state.banks[0], embedding[:, :config.model.embedding_dim], atol=1e-5)
  np.testing.assert_allclose(state.banks[1], embedding[:, config.model.embedding_dim:], atol=1e-5)
  # The random init's rows are unrelated to the encoder.
  assert np.max(np.abs(random_banks[0, :64] - state.banks[0])) > 0.1


def test_train_step_compiles_once():
  config = tiny_config("metaug")
  config.num_devices = 1
  exp = train.build_experiment(config)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return exp.method.train_step(state, batch)

  step_fn = parallel.pmap_step(counted, exp.devices)
  state = exp.init_state()
  for s in range(4):
    state, _ = step_fn(state, exp.loader.batch_at(s))
  assert len(traces) == 1


def _cli(args, env_extra=None, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "metaug_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_bad_config_with_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "w"
  for flag, needle in [("--config.method=byol", "config.method"),
                       ("--config.optim.lr=-1", "config.optim.lr"),
                       ("--config.batch_size=30", "config.batch_size"),
                       ("--config.model.conv1_weight_grad=fast",
                        "config.model.conv1_weight_grad"),
                       ("--config.xla_cpu_scheduler=lean", "config.xla_cpu_scheduler")]:
    extra = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = _cli(["--config=configs/digits.py", f"--workdir={workdir}", flag], extra)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not workdir.exists()


def test_cli_offline_cifar10_says_how_to_get_the_data(tmp_path):
  r = _cli(["--config=configs/cifar10.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data_dir={tmp_path / 'empty'}"], timeout=120)
  assert r.returncode != 0
  assert "tfds build" in r.stderr and "data_dir" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()


def _final_params(workdir):
  from metaug_jax import checkpoint as ckpt_lib
  config = tiny_config("metaug")
  exp = train.build_experiment(config)
  ckpt = ckpt_lib.Checkpointer(str(workdir), create=False)
  state = ckpt.restore_state(exp.abstract_state())
  ckpt.close()
  return jax.device_get(state)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  base = ["--config=configs/digits.py:tiny", "--config.method=metaug", "--config.batch_size=16",
          "--config.bank.num_negatives=16", "--config.metaug.lambda_aug=0.1",
          "--config.metaug.lambda_mi=0.1", "--config.metaug.inner_lr=0.1",
          "--config.eval.probe_after_training=False"]
  straight = _cli(base + [f"--workdir={tmp_path / 'a'}"])
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _cli(base + [f"--workdir={tmp_path / 'b'}", "--config.debug_kill_at_step=3"])
  assert killed.returncode == -9                     # SIGKILL: no clean-up ran
  steps = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
  assert "2" in steps and "6" not in steps
  resumed = _cli(base + [f"--workdir={tmp_path / 'b'}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from the checkpoint at step 2" in resumed.stdout
  a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
  assert int(a.step) == int(b.step) == 6
  assert_trees_close(a.params, b.params, atol=1e-6)
  assert_trees_close(a.banks, b.banks, atol=1e-6)


@pytest.mark.slow
def test_cli_end_to_end_trains_checkpoints_and_evaluates(tmp_path):
  workdir = tmp_path / "run"
  r = _cli(["--config=configs/digits.py:tiny", "--config.method=metaug", f"--workdir={workdir}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "linear probe" in r.stdout and "| fc |" in r.stdout
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_lines = [l for l in lines if "steps_per_sec" in l]   # others: kNN monitor records
  assert train_lines[-1]["step"] == 6
  assert {"oucl", "margin", "mag_grad_direct_norm",
          "mag_grad_second_order_norm"} <= set(train_lines[-1])
  assert any("knn_acc" in l for l in lines)
  for png in ("curves.png", "score_hist.png", "embedding_2d.png"):
    assert (workdir / png).stat().st_size > 1000
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  ev = subprocess.run([sys.executable, "-m", "metaug_jax.eval", f"--workdir={workdir}"],
                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "| conv |" in ev.stdout and os.path.exists(workdir / "eval_step_6.json")


@pytest.mark.slow  # two MetAug step compilations; the golden test pins the fused step too
def test_fused_meta_step_shares_phase_a_exactly():
  """virtual_step_from=current reuses Phase A's gradient: same encoder update, other MAG one."""
  paper, _ = run_steps(tiny_config("metaug"), 1, 1)
  fused, _ = run_steps(tiny_config("metaug", **{"metaug.virtual_step_from": "current"}), 1, 1)
  assert_trees_close(paper.params["encoder"], fused.params["encoder"], atol=1e-6)
  assert_trees_close(paper.banks, fused.banks, atol=1e-6)
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), paper.params["mag"],
                      fused.params["mag"])
  assert max(jax.tree.leaves(diff)) > 1e-7


@pytest.mark.slow  # two MetAug step compilations (test_models checks remat on the encoder)
def test_remat_metaug_step_matches_plain():
  """model.remat trades memory for recomputation only: the same MetAug step (both parts of
  the meta-gradient go through the rematerialised, linearised encoder)."""
  plain, m_plain = run_steps(tiny_config("metaug"), 1, 1)
  remat, m_remat = run_steps(tiny_config("metaug", **{"model.remat": True}), 1, 1)
  assert_trees_close(plain.params, remat.params, atol=1e-6)
  np.testing.assert_allclose(m_remat["mag_grad_second_order_norm"],
                             m_plain["mag_grad_second_order_norm"], rtol=1e-5)


# ---- safe long runs: damaged checkpoints, SIGTERM, non-finite states, honest progress ------

def loop_config(**overrides):
  """Tiny CMC with the monitor, the plots and the probe off: the cheapest whole loop."""
  c = digits.get_config("tiny,cmc")
  c.eval.monitor_every_steps = 0
  c.eval.plots = False
  c.eval.probe_after_training = False
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(experiment, workdir, stdout) of one finished tiny CMC run in this process, with
  checkpoints at steps 2, 4 and 6. Copy the workdir before changing it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exp, _ = train.train(loop_config(), workdir)
  return exp, workdir, out.getvalue()


def restore(exp, workdir, step=None):
  ckpt = ckpt_lib.Checkpointer(str(workdir), create=False)
  try:
    return jax.device_get(ckpt.restore_state(exp.abstract_state(), step))
  finally:
    ckpt.close()


def stderr_warnings(text):
  return [l for l in text.splitlines() if l.startswith("warning:")]


@pytest.mark.parametrize("damage,newest,why", [
    (lambda w: ckpt_damage.truncate_largest_file(w, 6), 4, "truncated or unreadable state"),
    (lambda w: ckpt_damage.delete_metadata(w, 6, ("_METADATA",)), 4,
     "truncated or unreadable state"),
    (lambda w: ckpt_damage.delete_metadata(w, 6), 4, "missing or unreadable config"),
    (lambda w: ckpt_damage.fake_unfinished_save(w, 8, like=6), 6,
     "a save that never finished")], ids=["truncated", "no_state_metadata", "no_metadata",
                                          "unfinished"])
def test_restore_intact_skips_a_damaged_newest_checkpoint(trained, tmp_path, damage, newest,
                                                         why):
  exp, workdir, _ = trained
  copy = ckpt_damage.copy_workdir(workdir, tmp_path / "w")
  damage(copy)
  ckpt = ckpt_lib.Checkpointer(copy, create=False)
  found = ckpt.restore_intact(lambda saved: exp.abstract_state())
  ckpt.close()
  assert found.step == newest and int(found.state.step) == newest
  [(step, reason)] = found.skipped
  assert step == (8 if newest == 6 else 6) and reason.startswith(why), reason
  assert "\n" not in reason and len(reason) < 250
  assert_trees_close(jax.device_get(found.state.params), restore(exp, workdir, newest).params,
                     atol=0)


def test_leftovers_of_a_failed_restore_are_quiet_and_other_errors_are_not(monkeypatch):
  """After a failed restore, orbax's abandoned reads print pages through sys.unraisablehook
  (300-2700 lines seen after the one-line error of a damaged --step): they are dropped; the
  rest still reaches the previous hook."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  ckpt_lib._quiet_orphaned_reads()  # pylint: disable=protected-access
  ckpt_lib._quiet_orphaned_reads()  # pylint: disable=protected-access  (installs once)
  coroutine = lambda path: types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=path))
  orbax_read = coroutine(os.path.join("site-packages", "orbax", "checkpoint", "_src", "x.py"))
  for error, obj in [(RuntimeError("Event loop is closed"), None),
                     (Exception("read failed"), orbax_read),
                     (ValueError("a real problem"), None),
                     (Exception("elsewhere"), coroutine(os.path.join("mine", "x.py")))]:
    sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=obj))
  assert [str(u.exc_value) for u in seen] == ["a real problem", "elsewhere"]


def test_resume_skips_a_truncated_checkpoint_with_one_warning_and_redoes_its_steps(
    trained, tmp_path, capsys):
  exp, workdir, _ = trained
  copy = ckpt_damage.copy_workdir(workdir, tmp_path / "w")
  ckpt_damage.truncate_largest_file(copy, 6)
  train.train(loop_config(), copy, experiment=exp)
  out, err = capsys.readouterr()
  [warning] = stderr_warnings(err)
  assert "skipping the checkpoint at step 6 (truncated or unreadable state: " in warning
  assert "resuming from step 4 (moved to " in warning and ckpt_lib.DAMAGED_DIR in warning
  assert "Traceback" not in err
  assert "resuming from the checkpoint at step 4" in out
  assert os.path.isdir(os.path.join(copy, ckpt_lib.DAMAGED_DIR, "6"))   # set aside, not lost
  redone = restore(exp, copy, 6)                                        # written again
  assert_trees_close(redone.params, restore(exp, workdir, 6).params, atol=0)


def test_resume_over_only_damaged_checkpoints_is_an_error_not_a_fresh_start(trained, tmp_path):
  exp, workdir, _ = trained
  copy = ckpt_damage.copy_workdir(workdir, tmp_path / "w")
  for step in (2, 4, 6):
    ckpt_damage.truncate_largest_file(copy, step)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as err:
    train.train(loop_config(), copy, experiment=exp)
  message = str(err.value)
  assert "\n" not in message and "every checkpoint" in message
  assert all(f"step {s}: truncated" in message for s in (2, 4, 6))
  assert "fresh --workdir" in message and "checkpoints" in message
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["2", "4", "6"]
  assert isinstance(err.value, cli.USER_ERRORS)


def test_a_workdir_with_only_an_unfinished_save_starts_from_step_0_with_a_warning(
    trained, tmp_path, capsys):
  exp, workdir, _ = trained
  copy = ckpt_damage.copy_workdir(workdir, tmp_path / "w")
  ckpt_damage.fake_unfinished_save(copy, 8, like=6)
  for step in (2, 4, 6):
    ckpt_damage.delete_step(copy, step)
  ckpt = ckpt_lib.Checkpointer(copy)
  state, newest = train._restore_or_init(exp, ckpt, copy)  # pylint: disable=protected-access
  ckpt.close()
  assert int(state.step) == 0 and newest is None
  [warning] = stderr_warnings(capsys.readouterr().err)
  assert "step 8 (a save that never finished" in warning and "starting from step 0" in warning


def test_loop_prints_one_plain_line_per_logging_step_off_a_terminal(trained):
  _, _, out = trained
  lines = [l for l in out.splitlines() if l.startswith("step ")]
  assert [l.split()[1] for l in lines] == ["2/6", "4/6", "6/6"], out
  assert all(" loss " in l and " steps/s " in l and " ETA " in l for l in lines)
  assert "\r" not in out


@pytest.fixture(scope="module")
def compiled(trained):
  """(experiment, the guarded step compiled for its state, the unguarded pmapped step)."""
  exp, _, _ = trained
  state = exp.init_state()
  guarded = train.compile_step(exp, state)
  plain = parallel.pmap_step(exp.method.train_step, exp.devices)
  return exp, guarded, plain


def test_finite_guard_leaves_the_step_numbers_unchanged(compiled):
  exp, guarded, plain = compiled
  assert len(exp.devices) == 4
  a, b = exp.init_state(), exp.init_state()
  for s in range(3):
    a, (metrics_a, flags) = guarded(a, exp.loader.batch_at(s))
    b, metrics_b = plain(b, exp.loader.batch_at(s))
  assert finite_guard.all_true(flags)
  assert_trees_close(jax.device_get(metrics_a), jax.device_get(metrics_b), atol=0)
  assert_trees_close(jax.device_get(a), jax.device_get(b), atol=0)


def test_async_save_keeps_its_step_while_the_next_steps_donate_the_buffers(compiled, tmp_path):
  """save() returns before the write ends; orbax must have copied the arrays by then, since
  the next step donates (deletes) them; close() waits for the write."""
  exp, guarded, _ = compiled
  state, _ = guarded(exp.init_state(), exp.loader.batch_at(0))
  # The same step again, for the values: fetching `state` itself would pin its buffers (a
  # CPU array keeps its host view), and pinned buffers are copied instead of donated.
  expected = jax.device_get(guarded(exp.init_state(), exp.loader.batch_at(0))[0])
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  assert ckpt.manager._options.enable_async_checkpointing  # pylint: disable=protected-access
  ckpt.save(1, state, exp.config)
  saved_leaves = jax.tree.leaves(state.params)
  for s in (1, 2):
    state, _ = guarded(state, exp.loader.batch_at(s))
  jax.block_until_ready(state)
  assert all(x.is_deleted() for x in saved_leaves)      # the buffers were donated
  ckpt.close()
  assert os.listdir(tmp_path / "checkpoints") == ["1"]  # finished: no temporary directory
  assert_trees_close(restore(exp, tmp_path, 1), expected, atol=0)


def test_sigterm_stops_the_loop_with_a_checkpoint_and_restores_the_handler(trained, tmp_path):
  exp, _, _ = trained
  workdir = str(tmp_path / "w")
  config = loop_config(num_train_steps=400, log_every_steps=1, checkpoint_every_steps=1000)
  metrics = os.path.join(workdir, "metrics.jsonl")

  def send_sigterm_after_a_few_steps():
    deadline = time.time() + 120
    while time.time() < deadline:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  before = signal.getsignal(signal.SIGTERM)
  sender = threading.Thread(target=send_sigterm_after_a_few_steps, daemon=True)
  sender.start()
  with pytest.raises(train.Interrupted) as err:
    train.train(config, workdir, experiment=dataclasses.replace(exp, config=config,
                                                                  total_steps=400))
  sender.join()
  assert signal.getsignal(signal.SIGTERM) is before
  assert err.value.exit_status == 143
  message = str(err.value)
  step = int(message.split(" at step ")[1].split(";")[0])
  assert 3 <= step < 400
  assert message == (f"interrupted by SIGTERM at step {step}; saved a checkpoint at step "
                     f"{step}: rerun the same command to resume")
  assert int(restore(exp, workdir, step).step) == step


def test_cli_turns_interrupts_into_one_line_and_the_signal_exit_status(capsys):
  for error, status in [(KeyboardInterrupt(), 130), (train.Interrupted("interrupted by "
                        "SIGTERM at step 3; saved a checkpoint at step 3", 143), 143)]:
    with pytest.raises(SystemExit) as exit_:
      with cli.user_errors_as_messages():
        raise error
    assert exit_.value.code == status
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # as `trained`
LOOP_FLAGS = ["--config=configs/digits.py:tiny,cmc", "--config.eval.monitor_every_steps=0",
              "--config.eval.plots=False", "--config.eval.probe_after_training=False"]


def test_cli_stops_a_diverging_run_in_one_line_without_a_nan_checkpoint(trained, tmp_path):
  """lr=1e30 from step 7 on (resumed from step 6): the old loop checkpointed step 8's NaNs
  and said the checkpoint "is kept"."""
  exp, workdir, _ = trained
  copy = ckpt_damage.copy_workdir(workdir, tmp_path / "w")
  r = _cli(LOOP_FLAGS + [f"--workdir={copy}", "--config.num_train_steps=12",
                         "--config.optim.lr=1e30", "--config.log_every_steps=3",
                         "--config.checkpoint_every_steps=2"], FOUR_DEVICES)
  assert r.returncode == 2, r.stderr[-3000:]
  # One error line; other lines may only be warnings (the learning-rate decay warning).
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  [line] = [l for l in lines if l.startswith("error:")]
  assert all(l.startswith("warning:") for l in lines if l != line), lines
  assert line.startswith("error: training diverged at step 7: the metric "), line
  assert "resume from the checkpoint at step 6 with a lower --config.optim.lr" in line
  steps = sorted(int(s) for s in os.listdir(os.path.join(copy, "checkpoints")))
  assert steps == [2, 4, 6]
  for step in steps:
    state = restore(exp, copy, step)
    assert bool(finite_guard.all_finite(state)), step


def _wait_for_steps(path, count, proc, timeout=300):
  """Waits until `path` (metrics.jsonl) holds `count` lines or the process ends."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and sum(1 for _ in open(path)) >= count:
      return
    time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
  base = LOOP_FLAGS + ["--config.num_train_steps=100", "--config.log_every_steps=1",
                       "--config.checkpoint_every_steps=1000"]
  straight = _cli(base + [f"--workdir={tmp_path / 'a'}"])
  assert straight.returncode == 0, straight.stderr[-3000:]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "metaug_jax.main", *base,
                           f"--workdir={tmp_path / 'b'}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_steps(tmp_path / "b" / "metrics.jsonl", 5, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
  [line] = lines                      # (a warning line may say the lr never decays)
  step = int(line.split(" at step ")[1].split(";")[0])
  assert 5 <= step < 100 and "Traceback" not in err
  assert line == (f"interrupted by SIGTERM at step {step}; saved a checkpoint at step {step}: "
                  f"rerun the same command to resume")
  assert os.listdir(tmp_path / "b" / "checkpoints") == [str(step)]
  resumed = _cli(base + [f"--workdir={tmp_path / 'b'}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from the checkpoint at step {step}" in resumed.stdout
  exp = train.build_experiment(loop_config())
  a, b = restore(exp, tmp_path / "a"), restore(exp, tmp_path / "b")
  assert int(a.step) == int(b.step) == 100
  assert_trees_close(a.params, b.params, atol=1e-6)
  assert_trees_close(a.banks, b.banks, atol=1e-6)
