"""The study scripts of experiments/ end to end on the seconds-long digits config: they train,
reuse their cache on a second call, and write their results file."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(script, tmp_path, *args):
  out = tmp_path / "out.md"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", script),
       f"--config={os.path.join(ROOT, 'configs', 'digits.py')}:tiny",
       f"--workdir={tmp_path / 'runs'}", "--seeds=0,1", f"--out={out}", *args],
      capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return out.read_text()


@pytest.mark.slow  # trains six tiny runs
def test_fa_study_writes_each_family_table_with_the_paired_tests(tmp_path):
  text = _study("fa_study.py", tmp_path, "--families=simsiam", "--placements=projector",
                "--ops=noise,dropout")
  rows = [l for l in text.splitlines() if l.startswith("| simsiam")]
  assert [r.split(" | ")[0] for r in rows] == ["| simsiam", "| simsiam_fa", "| simsiam_fa"]
  assert "(p=" in rows[1] and "| random-init floor |" in text and "Command:" in text
  # copy cosine and z std: the plain row logs the collapse monitor only, FA rows both.
  copy_cosine, z_std = (rows[0].split(" | ")[-3], rows[0].split(" | ")[-2])
  assert copy_cosine == "–" and 0 < float(z_std.split(" ± ")[0]) < 1
  assert all(0 < float(r.split(" | ")[-3].split(" ± ")[0]) <= 1 for r in rows[1:])


@pytest.mark.slow  # trains six tiny runs, two of them MetAug
def test_meta_gradient_study_reports_the_second_order_ratio(tmp_path):
  text = _study("meta_gradient_study.py", tmp_path, "--rows=cmc,metaug,metaug_first_order")
  rows = {l.split(" | ")[0].strip("| "): l.split(" | ") for l in text.splitlines()
          if l.startswith("| cmc") or l.startswith("| metaug")}
  assert float(rows["metaug"][11]) > 0 and rows["metaug_first_order"][11] == "0"
  assert rows["metaug_first_order"][6] == "metaug" and "floor: raw pixels" in text
