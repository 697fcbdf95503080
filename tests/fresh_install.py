"""Installs this checkout the way users do, into a fresh virtual environment outside it.

The package comes from a wheel built from a copy of the checkout (what `pip install .` and
`pip install git+URL` build) or from that copy as a path; only its dependencies are borrowed
from the test environment (a .pth line, so nothing is downloaded), and the checkout itself is
never on the new interpreter's path.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP = {".git", ".venv", "runs", "workdirs", "build", "dist", "__pycache__", ".pytest_cache"}


def copy_checkout(dest: str) -> str:
  """Copies the checkout's sources (no VCS data, venv, runs or build outputs) to `dest`."""
  def ignore(folder, names):
    return [n for n in names if n in _SKIP or n.endswith((".egg-info", ".pyc"))]
  shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
  return dest


def _pip(*args, python: str = None, cwd: str = None) -> None:
  """Runs the test environment's pip (on `python`'s environment when given)."""
  target = ["--python", python] if python else []
  subprocess.run([sys.executable, "-m", "pip", *target, "--disable-pip-version-check", "-q",
                  *args], check=True, cwd=cwd, capture_output=True, text=True, timeout=600)


def build_wheel(source: str, out_dir: str) -> str:
  """Builds the package's wheel from `source` (a copy of the checkout) into `out_dir`."""
  _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out_dir, source,
       cwd=out_dir)
  wheels = [f for f in os.listdir(out_dir) if f.endswith(".whl")]
  assert len(wheels) == 1, wheels
  return os.path.join(out_dir, wheels[0])


def fresh_venv(path: str) -> str:
  """A new virtual environment whose only borrowed paths are the test environment's
  site-packages (for the dependencies); returns its python."""
  venv.create(path, with_pip=False)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(site, "_borrowed_dependencies.pth"), "w") as f:
    f.write("\n".join(sorted(ours)) + "\n")
  return python


def install(python: str, target: str, build_isolation: bool = False) -> None:
  """pip install (no dependencies, nothing downloaded) of a wheel or source path."""
  flags = [] if build_isolation else ["--no-build-isolation"]
  _pip("install", "--no-deps", "--no-index", *flags, target, python=python)


def clean_env(**extra) -> dict:
  """The environment for the new interpreter: no PYTHONPATH (the checkout must not leak in)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(extra)
  return env
