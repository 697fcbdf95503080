"""Shape-safe resume and evaluation: a checkpoint whose state tree or array shapes differ from
the state the current config builds is refused in one line naming the differing arrays and
config fields (whatever field made them differ: fa.*, hai.*, moco.queue_size, the bank rows),
through the training and evaluation command lines, before anything compiles, and without
setting the checkpoint aside as damaged."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import checkpoint as ckpt_lib
from metaug_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402  (configs/digits.py)

# The checkpoint's run, as the command line builds it (the tests below change one field).
SAVED = "moco_fa,tiny"


def _state(queue_rows=8, generator=False):
  """A hand-built TrainState-like tree: {params, banks} of abstract arrays."""
  params = {"encoder": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}
  if generator:
    params["augmenter"] = {"fc1": {"bias": jax.ShapeDtypeStruct((5,), jnp.float32)}}
  return {"params": params, "banks": {"keys": jax.ShapeDtypeStruct((queue_rows, 4),
                                                                   jnp.float32)}}


def test_state_differences_name_missing_extra_and_reshaped_arrays():
  assert ckpt_lib.state_differences(_state(), _state()) == []
  assert ckpt_lib.state_differences(_state(8), _state(16, generator=True)) == [
      "params.augmenter.fc1.bias: not in the checkpoint",
      "banks.keys: checkpoint (8, 4), config (16, 4)"]
  assert ckpt_lib.state_differences(_state(generator=True), _state()) == [
      "params.augmenter.fc1.bias: only in the checkpoint"]


def test_config_differences_name_every_differing_field_eval_last():
  config = digits.get_config("moco_fa,tiny")
  saved = config.to_dict()
  saved = {**saved, "eval": {**saved["eval"], "knn_k": 7},
           "moco": {**saved["moco"], "queue_size": 96}}
  saved["fa"] = {k: v for k, v in saved["fa"].items() if k != "op"}
  assert ckpt_lib.config_differences(saved, config) == [
      "config.fa.op: checkpoint has nothing, config has 'noise'",
      "config.moco.queue_size: checkpoint has 96, config has 4096",
      "config.eval.knn_k: checkpoint has 7, config has 20"]
  # Tuples in the config and the lists JSON makes of them compare equal.
  assert ckpt_lib.config_differences(
      {**config.to_dict(), "optim": {**config.optim.to_dict(),
                                     "lr_decay_epochs": list(config.optim.lr_decay_epochs)}},
      config) == []


@pytest.fixture(scope="module")
def saved_workdir(tmp_path_factory):
  """(experiment, a workdir holding its initial state as the checkpoint at step 2): the
  command line's `configs/digits.py:moco_fa,tiny`, untrained (no step compiles)."""
  exp = train.build_experiment(digits.get_config(SAVED))
  workdir = str(tmp_path_factory.mktemp("saved") / "w")
  ckpt = ckpt_lib.Checkpointer(workdir)
  ckpt.save(2, jax.device_get(exp.init_state()).replace(step=np.int32(2)), exp.config)
  ckpt.close()
  return exp, workdir


def test_the_same_config_restores_the_saved_state(saved_workdir):
  exp, workdir = saved_workdir
  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  try:
    found = ckpt.restore_intact(lambda saved: ckpt_lib.Target(exp.abstract_state(),
                                                              exp.config))
  finally:
    ckpt.close()
  assert found.step == 2 and int(found.state.step) == 2 and not found.skipped


def test_a_hai_field_that_changes_the_state_is_refused_before_training(tmp_path):
  """hai.embed_dim is in no hand-written list: the state comparison names it."""
  config = digits.get_config("simsiam_hai,tiny")
  config.batch_size, config.hai.exits = 8, (3, 4)
  exp = train.build_experiment(config)
  workdir = str(tmp_path / "w")
  ckpt = ckpt_lib.Checkpointer(workdir)
  ckpt.save(2, jax.device_get(exp.init_state()), exp.config)
  ckpt.close()
  config.hai.embed_dim = 32
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
    train.train(config, workdir)
  message = str(err.value)
  assert "\n" not in message and "at step 2" in message, message
  assert "config.hai.embed_dim: checkpoint has 64, config has 32" in message
  assert "params.heads.exit3." in message and "checkpoint (" in message
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


def _cli(module, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _one_error_line(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  [line] = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert not [l for l in result.stderr.splitlines()
              if l.strip() and not l.startswith(("error:", "warning:"))], result.stderr
  return line


def test_resume_with_a_changed_fa_and_queue_field_is_one_line_and_exit_2(saved_workdir):
  _, workdir = saved_workdir
  line = _one_error_line(_cli(
      "metaug_jax.main", f"--config=configs/digits.py:{SAVED}", f"--workdir={workdir}",
      "--config.moco.queue_size=2048", "--config.fa.op=learned",
      "--config.fa.grad_policy=through"))
  # Parameters are named first (the generator's, absent from the checkpoint); the queue's
  # rows are among the arrays counted, and its field is named.
  assert "does not fit this config" in line and "params.augmenter." in line, line
  for field in ("config.fa.op: checkpoint has 'noise', config has 'learned'",
                "config.fa.grad_policy: checkpoint has 'detach_output', config has 'through'",
                "config.moco.queue_size: checkpoint has 4096, config has 2048"):
    assert field in line, line
  assert "fresh --workdir" in line
  # A mismatch is not damage: the checkpoint stays where it was.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert not os.path.exists(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))


def test_eval_with_a_config_whose_state_differs_is_one_line_and_exit_2(saved_workdir):
  _, workdir = saved_workdir
  line = _one_error_line(_cli(
      "metaug_jax.eval", f"--workdir={workdir}", f"--config=configs/digits.py:{SAVED}",
      "--config.fa.op=learned", "--config.fa.grad_policy=through"))
  assert "params.augmenter." in line and "not in the checkpoint" in line, line
  assert "config.fa.op: checkpoint has 'noise', config has 'learned'" in line
  assert "leave out --config" in line
