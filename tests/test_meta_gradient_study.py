"""experiments/meta_gradient_report.py (the table of experiments/meta_gradient_study.py): the second-order ratio read from a run's metrics and
the study table's paired tests, on hand-built runs (nothing trains)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import meta_gradient_report as study  # noqa: E402  (flag-free: the study's flags clash)


def _run(acc, ratio=None, sps=0.1):
  probe = {"linear": {"conv": {"test_acc": acc}, "fc": {"test_acc": acc - 1}},
           "few_label": {"fc": {"0.01": {"mean": acc - 20}}},
           "knn": {"embedding": {"test_acc": acc - 5}}}
  return {"probe": probe, "seconds_per_step": sps, "second_order_ratio": ratio}


def test_second_order_ratio_is_the_median_over_logged_steps(tmp_path):
  records = [{"step": 1, "loss": 1.0},   # a record without the MAG norms is skipped
             {"step": 2, "mag_grad_direct_norm": 2.0, "mag_grad_second_order_norm": 0.2},
             {"step": 3, "mag_grad_direct_norm": 1.0, "mag_grad_second_order_norm": 0.5},
             {"step": 4, "mag_grad_direct_norm": 4.0, "mag_grad_second_order_norm": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  assert study.second_order_ratio(str(tmp_path)) == 0.25
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}))
  assert study.second_order_ratio(str(tmp_path)) is None


def test_study_table_tests_each_row_against_its_reference():
  plan = {"cmc": ("cmc", {}, None), "metaug": ("metaug", {}, "cmc"),
          "metaug_first_order": ("metaug", {"metaug.first_order": True}, "metaug")}
  results = {"cmc": [_run(80.0), _run(82.0), _run(81.0)],
             "metaug": [_run(81.0, 0.01), _run(84.0, 0.03), _run(82.0, 0.02)],
             "metaug_first_order": [_run(81.0, 0.0), _run(84.0, 0.0), _run(82.0, 0.0)]}
  floors = {"cmc": [_run(70.0), _run(71.0), _run(72.0)],
            "metaug": [_run(70.0), _run(71.0), _run(72.0)]}
  pixels = [{"probe": {"linear": {"pixels": {"test_acc": 60.0}}}}] * 3
  text = study.study_table(list(plan), plan, results, floors, pixels)
  lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()}
  metaug = lines["metaug"]
  assert metaug[2] == "82.33 ± 1.53"                       # linear conv
  assert metaug[7].startswith("+1.33 (p=")                 # paired against cmc
  assert metaug[7].endswith(", 3/3)")
  assert metaug[11] == "0.02"                              # mean over seeds of the medians
  first = lines["metaug_first_order"]
  assert first[1] == "first_order=True" and first[6] == "metaug"
  assert first[7] == "+0.00 (p=–, 0/3)"
  # Identical floors of two architectures are one line; the pixel floor fills linear columns.
  assert "floor: random init (cmc, metaug)" in lines
  assert lines["floor: raw pixels"][2] == "60.00 ± 0.00"
