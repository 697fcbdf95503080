"""Multi-host data parallelism on localhost: 2 processes x 2 CPU devices == 1 process x 4.

Launches tests/multihost_worker.py twice with a coordinator on a free localhost port
(`jax.distributed.initialize`, gloo CPU collectives), each process holding 2 simulated CPU
devices, and once alone with 4 devices. All three train the tiny digits config (cmc and
metaug) with the same global batch of 32. Checks that:
  * each process fed only its half of every global batch (rows 0-15 / 16-31, images exact);
  * the final parameters, BN statistics and memory banks are identical in the two processes;
  * and equal, to float tolerance, to the single-process 4-device run.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
METHODS = ("cmc", "metaug")
STEPS = 3
TIMEOUT_S = 900


def _gloo_available() -> bool:
  """Whether this jaxlib was built with gloo TCP collectives (Linux wheels are)."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  """The parent's environment with this process's own simulated-device count."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _launch(args, num_devices: int, log_path: str) -> subprocess.Popen:
  """Starts one worker with its output in log_path (the child keeps its own copy of the fd)."""
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, WORKER, *args], env=_env(num_devices),
                            stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(HERE))


def _wait_all(procs, logs) -> None:
  """Waits for every process; on failure or timeout kills the rest and shows the logs."""
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if codes is None or any(codes):
    tails = "\n".join(f"--- {path} ---\n{open(path).read()[-4000:]}" for path in logs)
    pytest.fail(f"worker(s) failed (exit codes {codes}):\n{tails}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs the 2-process job, then the 1-process reference; returns the output folder."""
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)")
  out = tmp_path_factory.mktemp("multihost")
  coordinator = f"localhost:{_free_port()}"
  logs = [str(out / f"p{i}.log") for i in range(2)]
  procs = [_launch([f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}",
                    f"--methods={','.join(METHODS)}", f"--steps={STEPS}",
                    f"--out_dir={out / 'multi'}"], 2, logs[i]) for i in range(2)]
  _wait_all(procs, logs)
  log = str(out / "single.log")
  _wait_all([_launch([f"--methods={','.join(METHODS)}", f"--steps={STEPS}",
                      f"--out_dir={out / 'single'}"], 4, log)], [log])
  return out


def _load(path) -> dict:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _state_keys(record: dict) -> list:
  return sorted(k for k in record if k.startswith(("param/", "stats/")) or k == "banks")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_process_reads_only_its_part_of_the_global_batch(runs, method):
  p0, p1 = (_load(runs / "multi" / f"{method}_p{i}.npz") for i in range(2))
  for rec in (p0, p1):
    assert int(rec["process_count"]) == 2
    assert int(rec["local_devices"]) == 2 and int(rec["global_devices"]) == 4
  for step in range(STEPS):
    global_rows = p0[f"global_index_{step}"]
    np.testing.assert_array_equal(global_rows, p1[f"global_index_{step}"])
    half = len(global_rows) // 2
    assert int(p0["loader_local_rows"]) == half
    assert p0[f"index_{step}"].shape == (2, half // 2)
    np.testing.assert_array_equal(p0[f"index_{step}"].ravel(), global_rows[:half])
    np.testing.assert_array_equal(p1[f"index_{step}"].ravel(), global_rows[half:])
    assert bool(p0[f"image_ok_{step}"]) and bool(p1[f"image_ok_{step}"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_processes_agree_and_match_one_process(runs, method):
  p0, p1 = (_load(runs / "multi" / f"{method}_p{i}.npz") for i in range(2))
  single = _load(runs / "single" / f"{method}_p0.npz")
  assert int(single["process_count"]) == 1 and int(single["local_devices"]) == 4
  keys = _state_keys(single)
  assert keys == _state_keys(p0) == _state_keys(p1)
  assert any(k.startswith("param/['mag']") for k in keys) == (method == "metaug")
  for step in range(STEPS):  # the same global batches as the two processes together
    np.testing.assert_array_equal(single[f"index_{step}"].ravel(),
                                  p0[f"global_index_{step}"])
  worst = 0.0
  for k in keys:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=f"{k} differs between the processes")
    worst = max(worst, float(np.max(np.abs(p0[k].astype(np.float64) - single[k]))))
  assert worst <= 2e-5, f"2x2 devices vs 1x4 devices: max |diff| = {worst}"
