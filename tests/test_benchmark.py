"""experiments/benchmark.py end to end on the digits encoder: the plain step, every MetAug
variant and the per-part timing run, and the report has their rows and ratios (numbers are not
checked)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the benchmark end to end in a subprocess: every MetAug variant compiles
def test_benchmark_runs_the_metaug_variants_and_the_parts(tmp_path):
  md, js = tmp_path / "bench.md", tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "benchmark.py"), "--only=steps,parts",
       "--encoders=digits_conv", "--batches=digits_conv=16", "--steps=1", "--warmup=0",
       "--methods=cmc,metaug,metaug_fused,metaug_double_backward",
       f"--md_out={md}", f"--json_out={js}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.load(open(js))["results"]
  steps = {json.loads(v["setting"])["method"]: v["result"] for k, v in results.items()
           if k.startswith("steps:")}
  assert set(steps) == {"cmc", "metaug", "metaug_fused", "metaug_double_backward"}
  for name, r in steps.items():
    assert "error" not in r, (name, r.get("error"))
    assert r["finite"] and r["step_s"] > 0, name
  parts = next(v["result"] for k, v in results.items() if k.startswith("parts:"))
  assert set(parts["parts"]) == {"views", "phase_a", "phase_b", "full_step"}
  report = md.read_text()
  assert "| digits_conv | 16 |" in report and "x** |" in report
  assert "error" not in report


def _benchmark_modules(monkeypatch):
  """The benchmark's plan and report modules (they import each other by their file names)."""
  import importlib  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
  return importlib.import_module("benchmark_plan"), importlib.import_module("benchmark_report")


def test_settings_with_overrides_are_kept_apart_and_labelled(monkeypatch):
  """--resume must not reuse a float32 result for a bfloat16 run; tables name the override."""
  plan, report = _benchmark_modules(monkeypatch)
  plain = plan.Setting("anchor", "alexnet_half", "cmc", 64)
  bf16 = plan.Setting("anchor", "alexnet_half", "cmc", 64,
                      overrides=(("model.dtype", "bfloat16"),))
  assert plain.key != bf16.key
  assert plan.Setting.from_json(bf16.to_json()) == bf16
  assert bf16.label == "cmc [model.dtype=bfloat16]" and plain.label == "cmc"
  # Accelerator step times keep three significant digits; CPU ones three decimals.
  assert report._s(0.007496) == "0.0075" and report._s(0.0153) == "0.0153"
  assert report._s(11.3824) == "11.382" and report._s(None) == "–"
