"""The package installs as users install it: a wheel in a fresh virtual environment, used from
a directory outside the checkout, with the configs it ships."""

import configparser
import os
import subprocess
import zipfile

import pytest

import fresh_install

ROOT = fresh_install.ROOT


def _subpackages(top: str, prefix: str) -> set:
  """Dotted names of the folders under `top` that hold an __init__.py."""
  found = set()
  for folder, dirs, files in os.walk(top):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    if "__init__.py" in files:
      rel = os.path.relpath(folder, top)
      found.add(prefix if rel == "." else f"{prefix}.{rel.replace(os.sep, '.')}")
  return found


def test_setup_cfg_lists_every_subpackage():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  listed = set(cfg["options"]["packages"].split())
  expected = _subpackages(os.path.join(ROOT, "metaug_jax"), "metaug_jax")
  expected |= {"metaug_jax.configs"}
  assert listed == expected, "setup.cfg [options] packages must list every sub-package"


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
  """(python of a fresh venv with the wheel installed, the wheel's path)."""
  tmp = tmp_path_factory.mktemp("wheel")
  source = fresh_install.copy_checkout(str(tmp / "src"))
  wheel = fresh_install.build_wheel(source, str(tmp))
  python = fresh_install.fresh_venv(str(tmp / "venv"))
  fresh_install.install(python, wheel)
  return python, wheel, tmp


def test_wheel_holds_every_module_and_config(wheel_install):
  _, wheel, _ = wheel_install
  names = set(zipfile.ZipFile(wheel).namelist())
  for folder, _, files in os.walk(os.path.join(ROOT, "metaug_jax")):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
        assert rel in names, rel
  for f in os.listdir(os.path.join(ROOT, "configs")):
    if f.endswith(".py"):
      assert f"metaug_jax/configs/{f}" in names, f


@pytest.mark.slow  # a tiny training run in a new interpreter (~30 s on 2 cores)
def test_wheel_trains_from_outside_the_checkout(wheel_install):
  python, _, tmp = wheel_install
  elsewhere = tmp / "elsewhere"
  elsewhere.mkdir()
  env = fresh_install.clean_env(JAX_PLATFORMS="cpu")
  where = subprocess.run([python, "-c", "import metaug_jax, metaug_jax.configs.digits as d; "
                          "print(metaug_jax.__file__); print(d.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  venv_dir = str(tmp / "venv")
  assert all(l.startswith(venv_dir) for l in where.stdout.split()), where.stdout
  # The README's command, as written, from a directory without configs/: the installed copy.
  r = subprocess.run([python, "-m", "metaug_jax.main", "--config=configs/digits.py:tiny,cmc",
                      "--config.eval.plots=False", f"--workdir={elsewhere / 'run'}"],
                     cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "using the copy installed with metaug-jax" in r.stderr
  assert "| fc |" in r.stdout
  assert (elsewhere / "run" / "checkpoints").is_dir()
  assert not os.path.exists(os.path.join(ROOT, "runs", "run"))
