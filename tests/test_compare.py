"""experiments/compare.py and its helpers (experiments/comparison.py): paired tests over seeds,
the run cache key, the provenance footer, flags checked before training, the results tables
(every probe column per level, the floors, the paired tests, other papers' rows) and the
command itself on cached and on real tiny runs."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import comparison as compare  # noqa: E402  (experiments/comparison.py; compare.py defines flags)
from metaug_jax import train  # noqa: E402
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


# ---- the results tables -------------------------------------------------------------------------


def fake_probe(base: float) -> dict:
  """A probes.evaluate-shaped result whose numbers are offsets of `base` (hand-checkable)."""
  few = lambda level_base: {"0.01": {"mean": level_base - 40, "std": 1.0, "accs": [],
                                     "examples": 10},
                            "0.1": {"mean": level_base - 10, "std": 0.5, "accs": [],
                                    "examples": 100}}
  return {
      "linear": {"conv": {"dim": 8, "test_acc": base, "best_test_acc": base + 1,
                          "train_acc": 99.0},
                 "fc": {"dim": 4, "test_acc": base + 2, "best_test_acc": base + 3,
                        "train_acc": 99.0}},
      "few_label": {"conv": few(base), "fc": few(base + 2)},
      "val_selected": {"conv": {"test_acc": base - 1, "epoch": 3},
                       "fc": {"test_acc": base + 1, "epoch": 4}},
      "knn": {"embedding": {"dim": 4, "k": 20, "temperature": 0.07, "test_acc": base - 5},
              "fc": {"dim": 4, "k": 20, "temperature": 0.07, "test_acc": base - 3}},
      "protocol": {"knn_k": 20, "knn_temperature": 0.07, "few_label_draws": 5,
                   "val_fraction": 0.1}}


def fake_pixels(base: float) -> dict:
  probe = fake_probe(base)
  pick = lambda d: {"pixels": d["conv"]}
  return {"linear": pick(probe["linear"]), "few_label": pick(probe["few_label"]),
          "val_selected": pick(probe["val_selected"]), "knn": {"pixels": probe["knn"]["fc"]},
          "protocol": probe["protocol"]}


def fake_rows():
  """moco (seeds at 80, 82) and moco_ft (81, 85); both floors equal (same architecture and
  seeds), as a real comparison's would be."""
  run = lambda base, sps: {"probe": fake_probe(base), "seconds_per_step": sps}
  floor = lambda base: {"probe": fake_probe(base)}
  return [{"label": "moco", "method": "moco", "grid": {}, "paper": None,
           "runs": [run(80, 0.1), run(82, 0.3)], "floors": [floor(60), floor(61)]},
          {"label": "moco_ft", "method": "moco_ft", "grid": {}, "paper": None,
           "runs": [run(81, 0.2), run(85, 0.2)], "floors": [floor(60), floor(61)]}]


def table_rows(text: str) -> dict:
  """{(row, features): [cells]} of the first markdown table in `text`."""
  out, started = {}, False
  for line in text.splitlines():
    if not line.startswith("|"):
      if started:
        break
      continue
    started = True
    if line.startswith("| ") and not line.startswith("| row"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      out[(cells[0], cells[1])] = cells[2:]
  return out


def test_results_table_has_every_probe_column_per_level_and_the_floors():
  rows = fake_rows()
  pixels = [{"probe": fake_pixels(50)}, {"probe": fake_pixels(52)}]
  text = compare.results_table(rows, pixels, [])
  head = text.splitlines()[0]
  assert head == ("| row | features | all labels | 1 % labels | 10 % labels | val-selected | "
                  "kNN (k=20, T=0.07) | s / step |")
  got = table_rows(text)
  sd = lambda a, b: f"{abs(a - b) / 2 ** 0.5:.2f}"          # sample std of two values
  # moco conv: all labels 80, 82; 1 %: 40, 42; 10 %: 70, 72; val-selected 79, 81.
  assert got[("moco", "conv")] == [f"81.00 ± {sd(80, 82)}", f"41.00 ± {sd(40, 42)}",
                                   f"71.00 ± {sd(70, 72)}", f"80.00 ± {sd(79, 81)}", "–",
                                   "0.200"]
  assert got[("moco", "embedding")] == ["–", "–", "–", "–", f"76.00 ± {sd(75, 77)}", ""]
  assert got[("moco_ft", "fc")][0] == f"85.00 ± {sd(83, 87)}"
  # One floor row per level for both methods (identical floors are merged), then the pixels.
  assert got[("floor: random init (moco, moco_ft)", "conv")][0] == f"60.50 ± {sd(60, 61)}"
  assert got[("floor: raw pixels", "pixels")] == [f"51.00 ± {sd(50, 52)}",
                                                  f"11.00 ± {sd(10, 12)}",
                                                  f"41.00 ± {sd(40, 42)}",
                                                  f"50.00 ± {sd(49, 51)}",
                                                  f"48.00 ± {sd(47, 49)}", "–"]
  assert len(got) == 3 + 3 + 3 + 1
  narrow = table_rows(compare.results_table(rows, pixels, [], kinds=["knn"], levels=["fc"]))
  assert set(narrow) == {("moco", "fc"), ("moco_ft", "fc"),
                         ("floor: random init (moco, moco_ft)", "fc"),
                         ("floor: raw pixels", "pixels")}
  assert all(len(cells) == 2 for cells in narrow.values())   # kNN and s / step


def test_tests_table_pairs_every_column_and_the_floors_with_the_baseline():
  text = compare.tests_table(fake_rows(), "moco", [])
  assert text.startswith("Paired by seed against moco")
  got = table_rows(text)
  # moco_ft - moco per seed: +1 and +3 on every column -> mean +2, t = 2 / (sqrt(2) / sqrt(2))
  # with one degree of freedom: p = 1 - 2 atan(2) / pi.
  p = 1 - 2 * math.atan(2.0) / math.pi
  cell = f"+2.00 (p={p:.3g}, 2/2)"
  assert got[("moco_ft", "conv")] == [cell] * 4 + ["–"]
  assert got[("moco_ft", "embedding")] == ["–"] * 4 + [cell]
  # The floor (60, 61) against moco (80, 82): -20, -21.
  floor = got[("floor: random init (moco, moco_ft)", "fc")]
  assert floor[0].startswith("-20.50 (p=") and floor[0].endswith(", 0/2)")
  assert ("moco", "conv") not in got and compare.tests_table(fake_rows(), "", []) == ""


def test_other_papers_rows_are_a_second_reference_table():
  rows = fake_rows()
  text = compare.other_papers_table(rows, "digits")
  lines = text.splitlines()
  assert lines[0].startswith("Numbers reported by other papers")
  assert lines[2] == "| row | method | source | imagenet1k | imagenet100 |"
  body = lines[4:]
  source = "FT (ICCV 2021), README of the released code"
  assert body == [f"| MoCo v2 | moco | {source} | 67.50 / – | |",
                  f"| MoCo v2 + FT | moco_ft | {source} | 69.60 / – | |",
                  f"| MoCo + FT (ImageNet-100) | moco_ft | {source} | | 77.20 / – |"]
  # Table 1 numbers stay in their own table, without the other papers' rows.
  table1 = compare.paper_table([dict(rows[0], paper={"cifar10": (76.37, 79.30)})], "cifar10")
  assert table1.splitlines()[2:] == [
      "| row | tiny_imagenet | stl10 | cifar10 | cifar100 | ours on cifar10 |",
      "|---|---|---|---|---|---|", "| moco | | | 76.37 / 79.30 | | 81.00 / 83.00 |"]
  assert compare.other_papers_table([dict(rows[0], method="cmc")], "digits") == ""
  # Off Table 1's data sets a row without Table 1 numbers (e.g. simsiam_hai) gets no line.
  mixed = [dict(rows[0], paper={"cifar10": (76.37, 79.30)}),
           dict(rows[0], label="simsiam_hai", paper=None)]
  assert compare.paper_table(mixed, "digits").splitlines()[4:] == [
      "| moco | | | 76.37 / 79.30 | |"]


def _write(path, result):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f)


def test_compare_cli_prints_every_table_from_cached_runs(tmp_path):
  """The command on two seeds whose runs, floors and pixel floors are in the cache under the
  keys compare.py computes (so nothing trains): every table, and the cached numbers in it."""
  base = digits.get_config("tiny")
  rows = fake_rows()
  for row in rows:
    for seed, run, floor in zip((0, 1), row["runs"], row["floors"]):
      config = compare.row_config(base, row["method"], seed, {})
      name = compare.run_dir(row["method"], {}, seed, config)
      _write(tmp_path / name / "compare_result.json", run)
      exp = train.build_experiment(config)
      _write(tmp_path / compare.floor_dir(exp, exp.init_state()) / "floor_result.json", floor)
  for seed, base_acc in ((0, 50), (1, 52)):
    name = compare.pixel_dir(compare.pixel_config(base, seed))
    _write(tmp_path / name / "pixel_floor.json", {"probe": fake_pixels(base_acc)})
  before = sorted(os.listdir(tmp_path))
  out = tmp_path / "out.md"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "compare.py"),
       "--config=" + os.path.join(ROOT, "configs", "digits.py") + ":tiny",
       f"--workdir={tmp_path}", "--methods=moco,moco_ft", "--seeds=0,1", "--baseline=moco",
       f"--out={out}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == sorted(before + ["out.md"])   # nothing trained
  text = out.read_text()
  got = table_rows(text)
  assert got[("moco", "conv")][0] == f"81.00 ± {2 / 2 ** 0.5:.2f}"
  assert got[("floor: raw pixels", "pixels")][0] == f"51.00 ± {2 / 2 ** 0.5:.2f}"
  for needle in ("Paired by seed against moco", "Paper (Li et al. 2022, Table 1",
                 "| MoCo v2 + FT | moco_ft |", "*val-selected*", "Commit "):
    assert needle in text and needle in result.stdout, needle


def test_floor_key_ignores_training_fields_and_follows_the_seed_and_the_probes():
  """Grid rows that differ only in how they train share one random-init floor."""
  base = digits.get_config("tiny")

  def key(**changes):
    exp = train.build_experiment(compare.row_config(base, "metaug", changes.pop("seed", 0),
                                                    changes))
    return compare.floor_dir(exp, exp.init_state())
  plain = key()
  assert key(**{"metaug.lambda_aug": 0.5, "metaug.first_order": True, "optim.lr": 1.0}) == plain
  assert key(seed=1) != plain
  assert key(**{"eval.knn_k": 3}) != plain


def test_pixel_floor_key_follows_the_data_and_the_probes_not_the_method():
  config = compare.pixel_config(digits.get_config("tiny"), 0)
  key = compare.pixel_floor_key(config)
  other_method = compare.pixel_config(digits.get_config("moco,tiny"), 0)
  assert compare.pixel_floor_key(other_method) == key
  for field, value in (("seed", 1), ("eval.probe_lr", 0.5), ("data.max_train_examples", 100)):
    changed = config.copy_and_resolve_references()
    changed.update_from_flattened_dict({field: value})
    assert compare.pixel_floor_key(changed) != key, field


@pytest.mark.slow
def test_compare_trains_two_seeds_and_fills_every_column(tmp_path):
  """A real tiny comparison (cmc, 2 seeds): every probe column of every level from real probes,
  the random-init and raw-pixel floors, the paired tests of the floor; a second invocation
  reuses every run."""
  command = [sys.executable, os.path.join(ROOT, "experiments", "compare.py"),
             "--config=" + os.path.join(ROOT, "configs", "digits.py") + ":cmc,tiny",
             f"--workdir={tmp_path / 'runs'}", "--methods=cmc", "--seeds=0,1", "--baseline=cmc",
             "--config.eval.plots=False", "--config.eval.monitor_every_steps=0",
             "--config.eval.probe_epochs=2", f"--out={tmp_path / 'out.md'}"]
  first = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT)
  assert first.returncode == 0, first.stderr[-3000:]
  got = table_rows((tmp_path / "out.md").read_text())
  assert set(got) == {("cmc", "conv"), ("cmc", "fc"), ("cmc", "embedding"),
                      ("floor: random init (cmc)", "conv"), ("floor: random init (cmc)", "fc"),
                      ("floor: random init (cmc)", "embedding"), ("floor: raw pixels", "pixels")}
  for (row, level), cells in got.items():
    filled = [c for c in cells[:5] if c != "–"]          # the five probe columns
    assert len(filled) == {"conv": 4, "fc": 5, "embedding": 1, "pixels": 5}[level], (row, level)
    assert all("±" in c for c in filled), (row, level, cells)
  tests = table_rows((tmp_path / "out.md").read_text().split("Paired by seed")[1])
  assert set(tests) == {("floor: random init (cmc)", level) for level in ("conv", "fc",
                                                                         "embedding")}
  runs = sorted(os.listdir(tmp_path / "runs"))
  assert len(runs) == 6                                   # 2 runs, 2 floors, 2 pixel floors
  again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "step 2/6" not in again.stdout and sorted(os.listdir(tmp_path / "runs")) == runs
