"""Runs several methods (or a hyperparameter grid) with identical data, budget and seeds.

Prints markdown tables of every probe of the frozen encoders (metaug_jax/evaluation/probes.py:
linear probes with all labels, with 1 % / 10 % of each class's labels, at the epoch chosen on a
validation split, and the kNN classifier), mean ± std over seeds, a row per method and feature
level, with the measured seconds per training step; then the floors computed the same way by
the same command: the row's architecture at random initialisation and the raw pixels; then the
papers' numbers (MetAug's Table 1, and other papers' rows the methods register). Writes them
with the exact command to --out.

Runs are paired by seed: seed s gives every method the same data order (the loader's order is
a function of the seed alone), the same initial key, and the same label draws and validation
split in the probes. With --baseline=NAME each other row and each random-init floor gets, per
level and probe column, the mean of its per-seed differences to the baseline and the p-value
of a two-sided paired t-test on them (and the sign count), so a difference can be told from
seed noise. The results file records the git commit, the library versions, the device and the
wall time.

  # every row of MetAug's Table 1 (SimCLR, CMC, MoCo, BYOL, Barlow Twins, the debiased and
  # hard-negative variants, MetAug only-OUCL, MetAug), from the methods' registrations:
  python experiments/compare.py --config=configs/digits.py --workdir=runs/table1 \
      --methods=table1 --seeds=0,1,2 --out=experiments/results/digits_table1.md

  # chosen methods (any registered name), or a grid over fields (one row per combination):
  python experiments/compare.py --config=configs/digits.py --workdir=runs/compare \
      --methods=cmc,metaug_oucl_only,metaug --seeds=0,1,2 --baseline=cmc
  python experiments/compare.py --config=configs/digits.py --workdir=runs/sweep --methods=metaug \
      --grid="metaug.lambda_aug=1e-5,1e-3,1e-1;metaug.lambda_mi=1e-9,1e-5,1e-2"

  # fewer columns: only some probes and levels
  python experiments/compare.py ... --probes=linear,knn --levels=fc,embedding

Each row applies its method's config variant (as `configs/NAME.py:METHOD` does), then its own
overrides (e.g. loss.negatives=debiased), then the grid. A run's directory is named by its
row, its seed and a key hashing the fully resolved config and the library's source code, so a
finished run is reused only when neither changed: an interrupted comparison continues where it
stopped, and a changed override or changed code trains afresh. The raw-pixel floor depends on
the data and probe settings alone (the base config's, without the grid), so it is computed
once per seed and shared by every row.
"""

import glob
import itertools
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import comparison  # experiments/comparison.py
from comparison import run_key

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.")
_METHODS = flags.DEFINE_list("methods", ["cmc", "metaug_oucl_only", "metaug"],
                             "Registered method names, or 'table1' for every paper row.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"],
                           "Seeds (each run uses one; rows are paired by seed).")
_BASELINE = flags.DEFINE_string("baseline", "", "Row label or method name every other row is "
                                "tested against (paired t-test over seeds); empty: no tests.")
_GRID = flags.DEFINE_string("grid", "", "'field=v1,v2;field2=w1,w2': the product is run.")
_PROBES = flags.DEFINE_list("probes", [], "Probe columns to show: linear, few_label, "
                            "val_selected, knn (empty: all that ran).")
_LEVELS = flags.DEFINE_list("levels", [], "Feature levels to show, e.g. conv,fc,embedding "
                            "(empty: all; the raw-pixel floor is always shown).")
_OUT = flags.DEFINE_string("out", "", "Markdown file to write the tables (and command) to.")

PROBE_KINDS = ("linear", "few_label", "val_selected", "knn")


def _rows(names: list) -> list:
  """[(label, method, overrides, paper numbers or None)] for --methods."""
  from metaug_jax.methods import registry  # after the __main__ sys.path set-up
  if names == ["table1"]:
    return [(row.label, spec.name, dict(row.overrides), row.numbers)
            for spec, row in registry.table1_rows()]
  out = []
  for name in names:
    spec = registry.get(name)
    # MetAug's Table 1 numbers here; rows of other papers (e.g. Feature Transformation's
    # ImageNet numbers) go to comparison.other_papers_table.
    paper = next((r.numbers for r in spec.paper_rows
                  if not r.overrides and r.source == registry.TABLE1_SOURCE), None)
    out.append((name, name, {}, paper))
  return out


def _parse_grid(text: str) -> list:
  """'a=1,2;b=x' -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}] with literal values (a tuple
  value is bracketed: 'data.crop_scale=(0.2,1.0),(0.8,1.0)')."""
  # after the __main__ sys.path set-up
  from metaug_jax.config_base import parse_literal, split_top_level
  if not text:
    return [{}]
  axes = []
  for part in filter(None, text.split(";")):
    name, values = part.split("=", 1)
    axes.append([(name.strip(), parse_literal(v)) for v in split_top_level(values)])
  return [dict(combo) for combo in itertools.product(*axes)]


def _seconds_per_step(workdir: str) -> float:
  """Median seconds per step over the logged windows after the first (which compiles)."""
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]  # not monitor records
  rates = sorted(rates[1:] or rates)
  return 1.0 / rates[len(rates) // 2]


def _cached(path: str, compute) -> dict:
  """The JSON at `path`, or compute() (timed) written there."""
  if os.path.exists(path):
    return json.load(open(path))
  start = time.time()
  result = compute()
  result["wall_seconds"] = time.time() - start
  os.makedirs(os.path.dirname(path), exist_ok=True)
  json.dump(result, open(path, "w"), indent=2)
  return result


def _finished_run(parent: str, key: str):
  """The directory of a finished run with `key` under `parent`, whatever its row's name (a
  grid value equal to the default names the same run differently), else None."""
  done = sorted(glob.glob(os.path.join(glob.escape(parent), f"*-{key}", "compare_result.json")))
  return os.path.dirname(done[0]) if done else None


def run_one(config, workdir: str) -> dict:
  """Trains and probes `config` in `workdir` (or reads the result of an earlier run of the
  same config and code: directory names end in `run_key`, so one is found under any row's
  name); the result's `run_dir` is the directory that holds the run."""
  from metaug_jax import train

  key = run_key(config)
  if not os.path.exists(os.path.join(workdir, "compare_result.json")):
    workdir = _finished_run(os.path.dirname(workdir), key) or workdir

  def compute():
    probe = train.train_and_evaluate(config, workdir)
    return {"probe": probe, "seconds_per_step": _seconds_per_step(workdir), "key": key}
  return {**_cached(os.path.join(workdir, "compare_result.json"), compute), "run_dir": workdir}


def floor_one(config, parent: str) -> dict:
  """Every probe of `config`'s architecture at random initialisation, cached under `parent`
  by what the floor depends on (floor_key): rows that differ only in training fields (a grid
  over loss weights, a meta-gradient strategy) share one floor instead of recomputing it."""
  from metaug_jax import train

  exp = train.build_experiment(config)
  state = exp.init_state()

  def compute():
    return {"probe": train.evaluate_state(exp, state, title="random-init floor")}
  return _cached(os.path.join(parent, comparison.floor_dir(exp, state), "floor_result.json"), compute)


def pixel_floor(config, workdir: str) -> dict:
  """Every probe on the raw pixels of `config`'s data (cached; the key ignores the method)."""
  from metaug_jax.data import sources
  from metaug_jax.evaluation import probes

  def compute():
    dataset = sources.load_dataset(config)
    probe = probes.evaluate_pixels(dataset, config)
    print(probes.format_results(probe, f"raw-pixel floor ({config.dataset}, seed "
                                       f"{config.seed})"), flush=True)
    return {"probe": probe}
  return _cached(os.path.join(workdir, "pixel_floor.json"), compute)


def main(argv):
  del argv
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
  unknown = sorted(set(_PROBES.value) - set(PROBE_KINDS))
  if unknown:
    raise app.UsageError(f"--probes: unknown {', '.join(unknown)}; use any of "
                         f"{', '.join(PROBE_KINDS)}")
  rows = []
  for (label, method, row_overrides, paper), overrides in itertools.product(planned, grid):
    per_seed, floors = [], []
    for seed in _SEEDS.value:
      changes = {**row_overrides, **overrides}
      config = comparison.row_config(base, method, seed, changes)
      name = comparison.run_dir(method, changes, seed, config)
      print(f"== {name}", flush=True)
      per_seed.append(run_one(config, os.path.join(_WORKDIR.value, name)))
      floors.append(floor_one(config, _WORKDIR.value))
    rows.append({"label": label, "method": method, "grid": overrides, "paper": paper,
                 "runs": per_seed, "floors": floors})
  # After the training runs: the first of them applies the config's XLA settings, which must
  # come before anything starts JAX's backend.
  pixels = []
  for seed in _SEEDS.value:
    config = comparison.pixel_config(base, seed)
    name = comparison.pixel_dir(config)
    print(f"== {name}", flush=True)
    pixels.append(pixel_floor(config, os.path.join(_WORKDIR.value, name)))

  grid_keys = list(grid[0])
  kinds, levels = _PROBES.value or None, _LEVELS.value or None
  table = comparison.results_table(rows, pixels, grid_keys, kinds, levels)
  tests = comparison.tests_table(rows, _BASELINE.value, grid_keys, kinds, levels)
  paper = comparison.paper_table(rows, base.dataset)
  others = comparison.other_papers_table(rows, base.dataset)
  trained = sum(r.get("wall_seconds", 0.0) for row in rows for r in row["runs"] + row["floors"])
  trained += sum(r.get("wall_seconds", 0.0) for r in pixels)
  footer = comparison.provenance_footer(started, trained)
  seeds = ",".join(_SEEDS.value)
  caption = _caption(rows, seeds)
  sections = [s for s in (table, tests, paper, others) if s]
  print(f"\n{caption}\n\n" + "\n\n".join(sections) + f"\n\n{footer}")
  if _OUT.value:
    comparison.write_results(_OUT.value, f"{os.path.basename(base.dataset)}: "
                             f"{', '.join(_METHODS.value)}",
                             f"{caption}\n\n" + "\n\n".join(sections) + f"\n\n{footer}\n")


def _caption(rows: list, seeds: str) -> str:
  """What the results table's numbers are."""
  protocol = next((r["probe"].get("protocol", {}) for row in rows for r in row["runs"]), {})
  draws = protocol.get("few_label_draws")
  val = protocol.get("val_fraction", 0) * 100
  return (f"Top-1 test accuracy (%), mean ± std over seeds {seeds}, of probes on the frozen "
          f"features (docs/implementation.md §9): *all labels* = linear probe at its "
          f"final epoch; *x % labels* = linear probe on x % of each class's labels (per seed "
          f"the mean over {draws} label draws); *val-selected* = linear probe at the epoch "
          f"chosen on a stratified {val:g} % validation split of the training set (the test "
          f"set selects nothing); *kNN* = weighted kNN with the training set as memory. "
          f"Floors, computed the same way: *random init* = the row's architecture before "
          f"training (rows with identical floors merged), *raw pixels* = the flattened "
          f"images. s / step is the median training step time after compilation on this "
          f"machine.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from metaug_jax import cli
  app.call_after_init(cli.quiet_library_logs)
  app.run(main)
