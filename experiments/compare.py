"""Runs several methods (or a hyperparameter grid) with identical data, budget and seeds.

Prints a markdown table of linear-probe accuracies (mean +- std over seeds), the probe of the
same architecture at random initialisation (the floor, per row), and the measured seconds per
training step, beside the paper's numbers, and writes it with the exact command to --out.

Runs are paired by seed: seed s gives every method the same data order (the loader's order is
a function of the seed alone) and the same initial key. With --baseline=NAME each other row
gets, per feature level, the mean of its per-seed differences to the baseline and the p-value
of a two-sided paired t-test on them (and the sign count), so a difference can be told from
seed noise. The results file records the git commit, the library versions, the device and the
wall time.

  # every row of MetAug's Table 1 (SimCLR, CMC, MoCo, BYOL, Barlow Twins, the debiased and
  # hard-negative variants, MetAug only-OUCL, MetAug), from the methods' registrations:
  python experiments/compare.py --config=configs/digits.py --workdir=runs/table1 \
      --methods=table1 --seeds=0,1,2 --out=experiments/results/digits_table1.md

  # chosen methods (any registered name), or a grid over fields (one row per combination):
  python experiments/compare.py --config=configs/digits.py --workdir=runs/compare \
      --methods=cmc,metaug_oucl_only,metaug --seeds=0,1,2
  python experiments/compare.py --config=configs/digits.py --workdir=runs/sweep --methods=metaug \
      --grid="metaug.lambda_aug=1e-5,1e-3,1e-1;metaug.lambda_mi=1e-9,1e-5,1e-2"

Each row applies its method's config variant (as `configs/NAME.py:METHOD` does), then its own
overrides (e.g. loss.negatives=debiased), then the grid. A run's directory is named by its
row, its seed and a key hashing the fully resolved config and the library's source code, so a
finished run is reused only when neither changed: an interrupted comparison continues where it
stopped, and a changed override or changed code trains afresh.
"""

import itertools
import json
import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from comparison import accuracies, paired_test, provenance, run_key  # experiments/comparison.py

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.")
_METHODS = flags.DEFINE_list("methods", ["cmc", "metaug_oucl_only", "metaug"],
                             "Registered method names, or 'table1' for every paper row.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"],
                           "Seeds (each run uses one; rows are paired by seed).")
_BASELINE = flags.DEFINE_string("baseline", "", "Row label or method name every other row is "
                                "tested against (paired t-test over seeds); empty: no tests.")
_GRID = flags.DEFINE_string("grid", "", "'field=v1,v2;field2=w1,w2': the product is run.")
_OUT = flags.DEFINE_string("out", "", "Markdown file to write the table (and command) to.")


def _rows(names: list) -> list:
  """[(label, method, overrides, paper numbers or None)] for --methods."""
  from metaug_jax.methods import registry  # after the __main__ sys.path set-up
  if names == ["table1"]:
    return [(row.label, spec.name, dict(row.overrides), row.numbers)
            for spec, row in registry.table1_rows()]
  out = []
  for name in names:
    spec = registry.get(name)
    # Only MetAug's Table 1 numbers are printed (rows of other papers, e.g. Feature
    # Transformation's ImageNet numbers, have no Table 1 dataset to sit beside).
    paper = next((r.numbers for r in spec.paper_rows
                  if not r.overrides and r.source == registry.TABLE1_SOURCE), None)
    out.append((name, name, {}, paper))
  return out


def _paper_table(rows: list) -> str:
  """The paper's numbers for our rows, every dataset of Table 1 (empty where none)."""
  from metaug_jax.methods import registry
  if not any(paper for *_, paper in rows):
    return ""
  sets = registry.TABLE1_DATASETS
  lines = ["Paper (Li et al. 2022, Table 1; 300 epochs, best probe epoch), conv / fc:", "",
           "| row | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
  for label, _, _, paper in rows:
    cells = [f"{paper[d][0]:.2f} / {paper[d][1]:.2f}" if paper and d in paper else ""
             for d in sets]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _parse_grid(text: str) -> list:
  """'a=1,2;b=x' -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}] with literal values."""
  from metaug_jax.config_base import parse_literal  # after the __main__ sys.path set-up
  if not text:
    return [{}]
  axes = []
  for part in filter(None, text.split(";")):
    name, values = part.split("=", 1)
    axes.append([(name.strip(), parse_literal(v)) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)]


def _seconds_per_step(workdir: str) -> float:
  """Median seconds per step over the logged windows after the first (which compiles)."""
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]  # not monitor records
  rates = sorted(rates[1:] or rates)
  return 1.0 / rates[len(rates) // 2]


def run_one(config, workdir: str) -> dict:
  """Trains and probes `config` in `workdir` (or reads the result of an earlier run there;
  the directory name carries `run_key`, so an earlier run is only found for the same config
  and code)."""
  from metaug_jax import train
  done = os.path.join(workdir, "compare_result.json")
  if os.path.exists(done):
    return json.load(open(done))
  start = time.time()
  probe = train.train_and_evaluate(config, workdir)
  result = {"probe": probe, "seconds_per_step": _seconds_per_step(workdir),
            "wall_seconds": time.time() - start, "key": run_key(config)}
  json.dump(result, open(done, "w"), indent=2)
  return result


def floor_one(config, workdir: str) -> dict:
  """The linear probe of `config`'s architecture at random initialisation (cached)."""
  from metaug_jax import train
  done = os.path.join(workdir, "floor_result.json")
  if os.path.exists(done):
    return json.load(open(done))
  start = time.time()
  exp = train.build_experiment(config)
  probe = train.evaluate_state(exp, exp.init_state(), title="random-init floor")
  os.makedirs(workdir, exist_ok=True)
  result = {"probe": probe, "wall_seconds": time.time() - start}
  json.dump(result, open(done, "w"), indent=2)
  return result


def _mean_std(values: list) -> str:
  import numpy as np
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _cell(runs: list, level: str) -> str:
  accs = [a for a in accuracies(runs, level) if a is not None]
  return _mean_std(accs) if accs else "–"


def _test_cell(test: dict) -> str:
  """'+1.23 (p=0.012, 4/5)': mean difference, p-value, seeds where the row is ahead."""
  if not test["n"]:
    return "–"
  p = "p=–" if test["p"] is None else f"p={test['p']:.3g}"
  return f"{test['mean_diff']:+.2f} ({p}, {test['wins']}/{test['n']})"


def main(argv):
  del argv
  from metaug_jax.methods import registry
  started = time.time()
  base = _CONFIG.value
  grid = _parse_grid(_GRID.value)
  planned = _rows(_METHODS.value)
  if not _SEEDS.value:
    raise app.UsageError("--seeds is empty: pass at least one seed, e.g. --seeds=0,1,2,3,4")
  if _BASELINE.value and not any(_BASELINE.value in (label, method)
                                 for label, method, *_ in planned):
    # Checked before anything trains: a typo must not cost the whole comparison.
    raise app.UsageError(f"--baseline={_BASELINE.value!r} is not one of the rows "
                         f"({', '.join(label for label, *_ in planned)})")
  rows = []
  for (label, method, row_overrides, paper), overrides in itertools.product(planned, grid):
    per_seed, floors = [], []
    for seed in _SEEDS.value:
      config = base.copy_and_resolve_references()
      registry.apply_variant(config, method)
      config.seed = int(seed)
      config.progress_bar = False
      config.update_from_flattened_dict({**row_overrides, **overrides})
      tag = "_".join([method, *(f"{k.split('.')[-1]}{v}"
                                for k, v in {**row_overrides, **overrides}.items()),
                      f"seed{seed}"])
      key = run_key(config)
      print(f"== {tag} ({key})", flush=True)
      per_seed.append(run_one(config, os.path.join(_WORKDIR.value, f"{tag}-{key}")))
      floors.append(floor_one(config, os.path.join(_WORKDIR.value, f"floor_{tag}-{key}")))
    rows.append((label, method, overrides, paper, per_seed, floors))

  levels = [lvl for lvl in ("conv", "fc", "mag_hidden")
            if any(lvl in r["probe"] for *_, runs, _ in rows for r in runs)]
  cmc_time = next((sum(r["seconds_per_step"] for r in runs) / len(runs)
                   for label, _, _, _, runs, _ in rows if label in ("cmc", "CMC")), None)
  head = ["row", *(k for k in grid[0]), *(f"{lvl} acc (final)" for lvl in levels),
          *(f"{lvl} floor" for lvl in ("conv", "fc")), "s / step"]
  if cmc_time:
    head.append("step time / cmc")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, method, overrides, _, runs, floors in rows:
    cells = [label, *(f"{v:g}" if isinstance(v, float) else str(v) for v in overrides.values())]
    cells += [_cell(runs, lvl) for lvl in levels] + [_cell(floors, l) for l in ("conv", "fc")]
    sps = sum(r["seconds_per_step"] for r in runs) / len(runs)
    cells.append(f"{sps:.3f}")
    if cmc_time:
      cells.append(f"{sps / cmc_time:.2f}x")
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  seeds = ",".join(_SEEDS.value)
  tests = _tests_table(rows, levels, grid)
  paper = _paper_table([(label, m, o, p) for label, m, o, p, _, _ in rows])
  meta = provenance()
  wall = time.time() - started
  trained = sum(r.get("wall_seconds", 0.0) for *_, runs, fl in rows for r in runs + fl)
  footer = (f"Commit {meta['commit']} (code version {meta['code_version']}); {meta['versions']}; "
            f"{meta['device']}. Wall time of this command {wall / 60:.1f} min; the runs' own "
            f"wall time (training, probes and floors, including runs reused from an earlier "
            f"invocation) {trained / 60:.1f} min.")
  print(f"\nlinear-probe top-1 test accuracy (%), final probe epoch; seeds {seeds}\n{table}\n"
        f"\n{tests}\n\n{paper}\n\n{footer}")
  if _OUT.value:
    command = "python " + shlex.join(sys.argv)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(f"# {os.path.basename(base.dataset)}: {', '.join(_METHODS.value)}\n\n"
              f"Command:\n\n```\n{command}\n```\n\nLinear-probe top-1 test accuracy (%) at "
              f"the final probe epoch, mean ± std over seeds {seeds}; the floor is the same "
              f"probe of the row's architecture at random initialisation (same seeds); "
              f"s / step is the median training step time after compilation on this "
              f"machine.\n\n{table}\n\n{tests}\n\n{paper}\n\n{footer}\n")


def _tests_table(rows: list, levels: list, grid: list) -> str:
  """Paired differences of every row to --baseline, per level ('' without --baseline)."""
  if not _BASELINE.value:
    return ""
  def baseline_runs(overrides):
    return next((runs for label, method, o, _, runs, _ in rows
                 if _BASELINE.value in (label, method) and o == overrides), None)
  head = ["row", *(k for k in grid[0]), *(f"{lvl} vs {_BASELINE.value}" for lvl in levels)]
  lines = [f"Paired by seed against {_BASELINE.value}: mean difference in points (two-sided "
           f"paired t-test p-value, seeds where the row is ahead / seeds):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, method, overrides, _, runs, _ in rows:
    base_runs = baseline_runs(overrides)
    if runs is base_runs:
      continue
    cells = [label, *(f"{v:g}" if isinstance(v, float) else str(v) for v in overrides.values())]
    cells += [_test_cell(paired_test(accuracies(runs, lvl), accuracies(base_runs, lvl)))
              for lvl in levels]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from metaug_jax import cli
  app.call_after_init(cli.quiet_library_logs)
  app.run(main)
