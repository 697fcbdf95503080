"""What experiments/compare.py computes besides training: the run cache key, the paired test
over seeds and the provenance of a results file (no flags here, so tests can import it)."""

import functools
import hashlib
import os
import platform
import subprocess


@functools.lru_cache(maxsize=None)
def code_version() -> str:
  """A hash of the library's and the configs' source files: changes whenever the code does
  (computed once per invocation)."""
  import metaug_jax
  digest = hashlib.sha256()
  package = os.path.dirname(os.path.abspath(metaug_jax.__file__))
  for folder in (package, os.path.join(os.path.dirname(package), "configs")):
    for root, dirs, files in os.walk(folder):
      dirs.sort()
      for name in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(root, name)
        digest.update(os.path.relpath(path, folder).encode())
        digest.update(open(path, "rb").read())
  return digest.hexdigest()[:16]


def run_key(config) -> str:
  """The cache key of one run: the fully resolved config and the code version."""
  text = config.to_json_best_effort(sort_keys=True)
  return hashlib.sha256((text + code_version()).encode()).hexdigest()[:10]


def accuracies(runs: list, level: str) -> list:
  """Per-seed test accuracies of one feature level (None where a run lacks the level)."""
  return [r["probe"][level]["test_acc"] if level in r["probe"] else None for r in runs]


def paired_test(values: list, baseline: list) -> dict:
  """Mean per-seed difference, two-sided paired t-test p-value and the sign count.

  Pairs with a missing value on either side are dropped; with fewer than two pairs, or all
  differences equal, the p-value is undefined (None).
  """
  import numpy as np
  from scipy import stats
  pairs = [(a, b) for a, b in zip(values, baseline) if a is not None and b is not None]
  diff = np.array([a - b for a, b in pairs], np.float64)
  if not len(diff):
    return {"n": 0, "mean_diff": None, "p": None, "wins": 0}
  p = None
  if len(diff) >= 2 and np.ptp(diff) > 0:
    p = float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
  return {"n": len(diff), "mean_diff": float(diff.mean()), "p": p,
          "wins": int(np.sum(diff > 0)), "losses": int(np.sum(diff < 0))}


def provenance() -> dict:
  """What produced the results: commit, library versions, device, host."""
  import flax
  import jax
  import jaxlib
  import optax
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                            timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
  if git("status", "--porcelain", "--untracked-files=no"):
    commit += " (with uncommitted changes)"
  devices = jax.devices()
  return {"commit": commit, "code_version": code_version(),
          "versions": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
                      f"flax {flax.__version__}, optax {optax.__version__}, "
                      f"python {platform.python_version()}",
          "device": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
                    f"host {platform.machine()} with {os.cpu_count()} CPU cores"}
