"""experiments/compare.py and its helpers (experiments/comparison.py): paired tests over seeds,
the run cache key, the provenance footer, flags checked before training."""

import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import comparison as compare  # noqa: E402  (experiments/comparison.py; compare.py defines flags)
import digits  # noqa: E402  (configs/digits.py)


def test_paired_test_matches_the_t_distribution_with_two_degrees_of_freedom():
  # Differences 1, 2, 3: mean 2, sd 1, t = 2 sqrt(3); with 2 degrees of freedom the two-sided
  # p-value has the closed form 1 - t / sqrt(2 + t^2).
  test = compare.paired_test([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
  t = 2 * math.sqrt(3)
  assert test["n"] == 3 and test["mean_diff"] == pytest.approx(2.0)
  assert test["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
  assert (test["wins"], test["losses"]) == (3, 0)


def test_paired_test_pairs_by_seed_not_by_sorted_values():
  # Same values in another seed order: unpaired they tie, paired they differ every time.
  test = compare.paired_test([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0])
  assert test["mean_diff"] == pytest.approx(-1.0) and test["losses"] == 4
  assert test["p"] is None          # constant differences: the t statistic is undefined


def test_paired_test_drops_pairs_with_a_missing_side():
  test = compare.paired_test([1.0, None, 3.0], [0.0, 5.0, 1.0])
  assert test["n"] == 2 and test["mean_diff"] == pytest.approx(1.5)
  assert compare.paired_test([None], [1.0])["n"] == 0


def test_run_key_changes_with_an_override_and_with_the_code(monkeypatch):
  config = digits.get_config("tiny")
  key = compare.run_key(config)
  assert compare.run_key(digits.get_config("tiny")) == key          # deterministic
  other = digits.get_config("tiny")
  other.optim.lr = other.optim.lr * 2
  assert compare.run_key(other) != key
  monkeypatch.setattr(compare, "code_version", lambda: "another-version")
  assert compare.run_key(config) != key


def test_provenance_names_commit_versions_and_device():
  meta = compare.provenance()
  assert meta["commit"] and "jax " in meta["versions"] and "flax " in meta["versions"]
  assert "cpu" in meta["device"].lower()


def test_unknown_baseline_is_a_usage_error_before_any_training(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "compare.py"),
       "--config=" + os.path.join(ROOT, "configs", "digits.py") + ":tiny",
       f"--workdir={tmp_path}", "--methods=cmc", "--seeds=0", "--baseline=simclr"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode != 0
  assert "--baseline='simclr' is not one of the rows (cmc)" in result.stderr
  assert not os.listdir(tmp_path)                   # nothing trained
