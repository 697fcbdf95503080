"""The command line: the default workdir (the same command resumes) and one-line flag errors."""

import os
import subprocess
import sys

import pytest

from metaug_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_workdir_is_the_config_stem_and_its_variant_parts():
  assert cli.default_workdir("configs/cifar10.py") == os.path.join("runs", "cifar10")
  assert cli.default_workdir("configs/digits.py:tiny,cmc") == os.path.join("runs",
                                                                          "digits-tiny-cmc")
  assert cli.default_workdir("/abs/x/stl10.py:small,") == os.path.join("runs", "stl10-small")
  assert cli.default_workdir("c.py:res=128,a/b") == os.path.join("runs", "c-res=128-a_b")


def test_unknown_config_fields_name_the_closest_fields():
  lines = cli.unknown_config_fields(["prog", "--config.optim.lrr=0.1", "--config.optim.lr=1",
                                     "--config.data.input_sise=3", "--workdir=x",
                                     "--config.zzzz"])
  assert len(lines) == 3
  assert lines[0].startswith("--config.optim.lrr:") and "did you mean optim.lr" in lines[0]
  assert "data.input_size" in lines[1]
  assert "metaug_jax/config_base.py" in lines[2]


@pytest.mark.slow
def test_cli_without_workdir_trains_into_runs_and_the_same_command_resumes(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  command = [sys.executable, "-m", "metaug_jax.main",
             f"--config={os.path.join(ROOT, 'configs', 'digits.py')}:tiny,simclr",
             "--config.eval.probe_after_training=False", "--config.eval.plots=False",
             "--config.eval.monitor_every_steps=0"]
  first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  expected = os.path.join("runs", "digits-tiny-simclr")
  assert (f"workdir: {expected} (default from the config; pass --workdir to choose)"
          in first.stdout)
  assert os.path.isdir(tmp_path / expected / "checkpoints")
  again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from the checkpoint at step 6" in again.stdout
  assert os.listdir(tmp_path) == ["runs"]
