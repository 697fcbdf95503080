"""The Colab TPU notebook's code path, executed on CPU so that it cannot rot.

The code cells of experiments/colab_tpu.ipynb run in order as one script in a subprocess (its
own XLA device count, no pytest absl state) of a fresh virtual environment into which the
package is installed as the notebook's install cell does (`pip install git+URL`, here a copy of
this checkout as the path: nothing on PYTHONPATH), with shell magics dropped, the parameter cell
replaced by a tiny digits run, and the IPython.display import replaced by a stand-in where
IPython is not installed.
"""

import importlib.util
import json
import os
import subprocess

import pytest

import fresh_install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_tpu.ipynb")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# MetAug without the MAGs (no second-order compile: 50-85 s instead of ~130 s on a busy 2-core
# CPU); the cells do not depend on the method, and test_train covers full MetAug end to end.
TINY_OVERRIDES = {
    "dataset": "digits", "download": False, "method": "metaug_oucl_only",
    "data.views": "augmented_copies", "data.num_views": 2, "data.input_size": 16,
    "data.crop_scale": (0.5, 1.0), "data.flip": False,
    "model.encoder": "digits_conv", "model.width": 0.5, "model.embedding_dim": 32,
    "model.mag_hidden": 64,
    "batch_size": 30,                       # not a multiple of 4 devices: the notebook rounds
    "num_train_steps": 4, "bank.num_negatives": 32, "log_every_steps": 2,
    "checkpoint_every_steps": 2, "progress_bar": False,
    "eval.probe_epochs": 3, "eval.monitor_every_steps": 2, "eval.monitor_examples": 64,
    "eval.tsne_max_points": 60,
}

DISPLAY_IMPORT = "from IPython.display import Image, display"
# Where IPython is not installed, the display cell's import becomes this stand-in.
DISPLAY_STANDIN = ("Image = lambda filename=None, **kw: filename; "
                   "display = lambda *objs: print('display:', *objs)")


def load_cells():
  """(code sources, index of the parameter cell) of the notebook, checked as nbformat v4."""
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and isinstance(nb["cells"], list)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
             for c in code]
  params = [i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", [])]
  assert len(params) == 1, "exactly one code cell must be tagged 'parameters'"
  return sources, params[0]


def notebook_script(workdir: str) -> str:
  """The notebook's code as one script: tiny parameters, shell magics dropped."""
  sources, param_index = load_cells()
  names = {"REPO_URL", "WORKDIR", "DATA_DIR", "OVERRIDES"}
  assert all(f"{n} =" in sources[param_index] for n in names), sources[param_index]
  sources[param_index] = (f"REPO_URL = 'unused'\nWORKDIR = {workdir!r}\nDATA_DIR = ''\n"
                          f"OVERRIDES = {TINY_OVERRIDES!r}\n")
  assert any(l.strip().startswith("!pip") for l in "\n".join(sources).splitlines())
  assert sum(DISPLAY_IMPORT in s for s in sources) == 1
  standin = importlib.util.find_spec("IPython") is None
  parts = []
  for i, src in enumerate(sources):
    lines = ["pass  # shell magic" if l.lstrip().startswith(("!", "%")) else
             DISPLAY_STANDIN if standin and l.strip() == DISPLAY_IMPORT else l
             for l in src.splitlines()]
    parts.append(f"# ---- cell {i}\n" + "\n".join(lines) + "\n")
  return "\n".join(parts)


def test_notebook_parameters_cell_comes_before_everything_that_uses_it():
  sources, param_index = load_cells()
  assert param_index == 0
  assert "REPO_URL" in sources[1] and "jax[tpu]" in sources[1]
  assert "paper_config(\"cifar10\")" in "\n".join(sources)


def test_notebook_install_cell_installs_this_repository():
  sources, _ = load_cells()
  pip_lines = [l.strip() for s in sources for l in s.splitlines() if l.strip().startswith("!pip")]
  assert len(pip_lines) == 1 and '"git+{REPO_URL}"' in pip_lines[0], pip_lines


@pytest.mark.slow  # 50-85 s on a busy 2-core CPU
def test_notebook_runs_end_to_end_on_cpu(tmp_path):
  workdir = tmp_path / "run"
  script = tmp_path / "notebook_script.py"
  script.write_text(notebook_script(str(workdir)))
  # The install cell's `pip install git+{REPO_URL}`: pip builds and installs the repository
  # (here a copy of this checkout) into the notebook's interpreter, a fresh venv.
  python = fresh_install.fresh_venv(str(tmp_path / "venv"))
  fresh_install.install(python, fresh_install.copy_checkout(str(tmp_path / "repo")))
  env = fresh_install.clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                JAX_PLATFORMS="cpu")
  r = subprocess.run([python, str(script)], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
  assert "4 devices (cpu)" in r.stdout
  assert str(tmp_path / "venv") in subprocess.run(
      [python, "-c", "import metaug_jax; print(metaug_jax.__file__)"], cwd=str(tmp_path),
      env=env, capture_output=True, text=True, check=True).stdout
  assert "batch_size 30 -> 32" in r.stdout
  assert "| fc |" in r.stdout and "| embedding |" in r.stdout and "| kNN (k=" in r.stdout
  assert "| 10 % labels |" in r.stdout and "| val-selected (epoch) |" in r.stdout
  assert (workdir / "eval_step_4.json").exists()
  for name in ("curves.png", "score_hist.png", "embedding_2d.png"):
    with open(workdir / name, "rb") as f:
      data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
    assert name in r.stdout                 # listed by the display cell
