"""Bad configs and bad data sets through the real CLI, one subprocess each: every one must end
with exit status 2, one 'error:' line per problem on stderr, no traceback, and nothing written.

Errors come before any compilation (data errors right after loading the tiny data), so a case
costs about one JAX import (2.5-4 s).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow   # 42 subprocesses: about 2.5 minutes on a busy 2-core CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--config={os.path.join(ROOT, 'configs', 'digits.py')}:tiny"


def _npz(path, x, **arrays):
  np.savez(path, x=x, **arrays)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A folder of tiny bad (and a few good) data sets: 40 images of 8x8 unless said otherwise."""
  d = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
  labels = np.arange(40) % 2
  _npz(d / "ok.npz", grey, y=labels)
  _npz(d / "unlabelled.npz", grey)
  _npz(d / "float.npz", grey / 255.0, y=labels)
  _npz(d / "chw.npz", rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), y=labels)
  _npz(d / "rgba.npz", rng.integers(0, 256, (40, 8, 8, 4), dtype=np.uint8), y=labels)
  _npz(d / "gap.npz", grey, y=np.array([0, 1000000] * 20))
  _npz(d / "float_labels.npz", grey, y=labels.astype(np.float32))
  _npz(d / "empty.npz", grey[:0])
  np.savez(d / "no_x.npz", images=grey, y=labels)
  (d / "two_npz").mkdir()
  _npz(d / "two_npz" / "a.npz", grey)
  _npz(d / "two_npz" / "b.npz", grey)
  for name in ("bad_png", "text_only", "empty_folder"):
    (d / name).mkdir()
  for i in range(4):
    Image.fromarray(grey[i]).save(d / "bad_png" / f"{i}.png")
  (d / "bad_png" / "broken.png").write_bytes(b"not a png")
  (d / "text_only" / "notes.txt").write_text("no images here")
  return d


NPZ = "--config.dataset=npz"
FOLDER = "--config.dataset=folder"

# (id, arguments after the tiny digits config ({d}: the data folder), problem lines, phrase)
CASES = [
    # ---- numbers out of range, NaN and inf ------------------------------------------------
    ("lr_nan", ["--config.optim.lr=nan"], 1, "config.optim.lr=nan must be a finite number"),
    ("lr_inf", ["--config.optim.lr=inf"], 1, "config.optim.lr=inf must be a finite number"),
    ("lr_negative", ["--config.optim.lr=-1"], 1, "config.optim.lr=-1.0 must be"),
    ("log_every_0", ["--config.log_every_steps=0"], 1, "config.log_every_steps=0"),
    ("probe_epochs_0", ["--config.eval.probe_epochs=0"], 1, "config.eval.probe_epochs=0"),
    ("prefetch_0", ["--config.data.prefetch=0"], 1, "config.data.prefetch=0"),
    ("embedding_dim_0", ["--config.model.embedding_dim=0"], 1, "config.model.embedding_dim=0"),
    ("keep_checkpoints_negative", ["--config.keep_checkpoints=-1"], 1,
     "config.keep_checkpoints=-1"),
    ("crop_scale_reversed", ["--config.data.crop_scale=(1.0,0.5)"], 1,
     "--config.data.crop_scale=(0.5,1.0)"),
    ("decay_epochs_fraction", ["--config.optim.lr_decay_epochs=(1.5,)"], 1,
     "a tuple of integers >= 0"),
    ("momentum_1", ["--config.optim.momentum=1.0"], 1, "in [0, 1)"),
    ("two_bad_fields", ["--config.optim.lr=nan", "--config.log_every_steps=0"], 2,
     "config.log_every_steps=0"),
    ("no_length", ["--config.num_epochs=0", "--config.num_train_steps=0"], 1,
     "set config.num_epochs or config.num_train_steps"),
    # ---- choices, encoders, flags ---------------------------------------------------------
    ("bad_choice", ["--config.method=byol2"], 1, "config.method='byol2' is not one of"),
    ("method_needs_shared_encoder", ["--config.method=byol"], 1,
     "config.method='byol' uses one encoder for both views"),
    ("unknown_dataset", ["--config.dataset=imagenet"], 1, "config.dataset='imagenet'"),
    ("alexnet_small_28_npz", [NPZ, "--config.data_dir={d}/ok.npz",
                              "--config.model.encoder=alexnet_small",
                              "--config.data.input_size=28"], 1, "a multiple of 32"),
    ("alexnet_half_32", ["--config.model.encoder=alexnet_half", "--config.data.input_size=32"],
     1, "224 only"),
    ("typo_field", ["--config.optim.lrr=0.1"], 1, "did you mean optim.lr"),
    ("bad_int", ["--config.batch_size=abc"], 1, "--config.batch_size=abc"),
    ("unknown_flag", ["--workdr=x"], 1, "Unknown command line flag 'workdr'"),
    ("stray_argument", ["train"], 1, "unexpected arguments"),
    # ---- npz data -------------------------------------------------------------------------
    ("npz_float_pixels", [NPZ, "--config.data_dir={d}/float.npz"], 1,
     "np.round(x * 255).astype(np.uint8)"),
    ("npz_channels_first", [NPZ, "--config.data_dir={d}/chw.npz"], 1, "channels-first"),
    ("npz_4_channels", [NPZ, "--config.data_dir={d}/rgba.npz"], 1, "x[..., :3]"),
    ("npz_label_gap", [NPZ, "--config.data_dir={d}/gap.npz"], 1,
     "missing 1..999999"),
    ("npz_float_labels", [NPZ, "--config.data_dir={d}/float_labels.npz"], 1,
     "integer class ids"),
    ("npz_no_x", [NPZ, "--config.data_dir={d}/no_x.npz"], 1, "has no 'x' array"),
    ("npz_empty", [NPZ, "--config.data_dir={d}/empty.npz"], 1, "holds no images"),
    ("npz_missing", [NPZ, "--config.data_dir={d}/nope.npz"], 1, "not found"),
    ("npz_folder_of_two", [NPZ, "--config.data_dir={d}/two_npz"], 1, "holds 2 .npz files"),
    ("npz_batch_too_large", [NPZ, "--config.data_dir={d}/ok.npz", "--config.batch_size=256"],
     1, "config.batch_size=256 exceeds the 32 pre-training examples"),
    ("npz_unlabelled_probe", [NPZ, "--config.data_dir={d}/unlabelled.npz"], 1,
     "--config.eval.probe_after_training=False"),
    ("npz_grey_lab_views", [NPZ, "--config.data_dir={d}/ok.npz", "--config.data.views=lab"],
     1, "needs colour"),
    # ---- folders and archives -------------------------------------------------------------
    ("folder_non_image_png", [FOLDER, "--config.data_dir={d}/bad_png"], 1, "broken.png"),
    ("folder_text_only", [FOLDER, "--config.data_dir={d}/text_only"], 1,
     "it holds only notes.txt"),
    ("folder_empty", [FOLDER, "--config.data_dir={d}/empty_folder"], 1, "it is empty"),
    ("folder_missing", [FOLDER, "--config.data_dir={d}/nope"], 1, "not found"),
    ("folder_without_data_dir", [FOLDER], 1, "--config.data_dir=PATH"),
    ("cifar_archive_wrong_dir", ["--config.dataset=cifar_archive",
                                 "--config.data_dir={d}/text_only"], 1, "No CIFAR batches"),
]


def _run(args, cwd):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)                # one CPU device, as a user's first run
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "metaug_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,args,num_lines,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_per_problem_exit_2_and_writes_nothing(
    tmp_path, data, name, args, num_lines, phrase):
  del name
  workdir = tmp_path / "run"
  r = _run([TINY, f"--workdir={workdir}", *(a.format(d=data) for a in args)], cwd=tmp_path)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  # Besides the problems only build-time warnings (the lr-decay one) may be printed.
  assert all(l.startswith(("error: ", "warning: ")) for l in lines), lines
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == num_lines and any(phrase in l for l in errors), lines
  assert not workdir.exists()


def test_bad_config_without_workdir_writes_no_default_run_folder(tmp_path):
  r = _run([TINY, "--config.optim.lr=nan"], cwd=tmp_path)
  assert r.returncode == 2 and "config.optim.lr=nan" in r.stderr, r.stderr[-3000:]
  assert "workdir: runs/digits-tiny" in r.stdout
  assert not (tmp_path / "runs").exists()


def test_missing_or_broken_config_file_is_one_line(tmp_path):
  for config, phrase in ((f"--config={tmp_path / 'nope.py'}", "cannot load the config file"),
                         (TINY.replace(":tiny", ":bogus"), "unknown digits config argument")):
    r = _run([config, f"--workdir={tmp_path / 'run'}"], cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and phrase in lines[0], lines
    assert not (tmp_path / "run").exists()
