"""Runs several methods (or a hyperparameter grid) with identical data, budget and seeds.

Prints a markdown table of linear-probe accuracies (mean +- std over seeds) and the measured
seconds per training step, and writes it with the exact command to --out.

  python experiments/compare.py --config=configs/digits.py --workdir=runs/compare \
      --methods=cmc,metaug_oucl_only,metaug --seeds=0,1,2 --out=experiments/results/digits.md

  # a grid over MetAug's loss weights (one row per combination):
  python experiments/compare.py --config=configs/digits.py --workdir=runs/sweep --methods=metaug \
      --grid="metaug.lambda_aug=1e-5,1e-3,1e-1;metaug.lambda_mi=1e-9,1e-5,1e-2"

Runs already finished in --workdir are reused (their probe JSON is read), so an interrupted
comparison continues where it stopped.
"""

import itertools
import json
import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.")
_METHODS = flags.DEFINE_list("methods", ["cmc", "metaug_oucl_only", "metaug"], "Methods.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (each run uses one).")
_GRID = flags.DEFINE_string("grid", "", "'field=v1,v2;field2=w1,w2': the product is run.")
_OUT = flags.DEFINE_string("out", "", "Markdown file to write the table (and command) to.")


# Paper Table 1 (spec section 8): linear-probe top-1 %, (conv, fc), CMC backbone.
PAPER_TABLE1 = {
    "tiny_imagenet": {"cmc": (41.58, 40.11), "metaug_oucl_only": (42.02, 42.14),
                      "metaug": (44.51, 45.36)},
    "stl10": {"cmc": (83.03, 85.06), "metaug_oucl_only": (84.09, 84.72),
              "metaug": (85.41, 85.62)},
    "cifar10": {"cmc": (81.31, 83.28), "metaug_oucl_only": (85.98, 87.13),
                "metaug": (87.87, 88.12)},
    "cifar100": {"cmc": (58.13, 56.72), "metaug_oucl_only": (59.21, 58.73),
                 "metaug": (59.97, 61.06)},
}


def _paper_rows(dataset: str, methods: list) -> str:
  """The paper's numbers for the same methods, to print beside ours (empty if none)."""
  table = PAPER_TABLE1.get(dataset)
  if not table:
    return ""
  lines = [f"Paper (Li et al. 2022, Table 1, {dataset}; 300 epochs, best probe epoch):", "",
           "| method | conv | fc |", "|---|---|---|"]
  lines += [f"| {m} | {table[m][0]:.2f} | {table[m][1]:.2f} |" for m in methods if m in table]
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
  from metaug_jax import train
  done = os.path.join(workdir, "compare_result.json")
  if os.path.exists(done):
    return json.load(open(done))
  start = time.time()
  probe = train.train_and_evaluate(config, workdir)
  result = {"probe": probe, "seconds_per_step": _seconds_per_step(workdir),
            "wall_seconds": time.time() - start}
  json.dump(result, open(done, "w"), indent=2)
  return result


def _mean_std(values: list) -> str:
  import numpy as np
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def main(argv):
  del argv
  base = _CONFIG.value
  rows = []
  for method, overrides in itertools.product(_METHODS.value, _parse_grid(_GRID.value)):
    per_seed = []
    for seed in _SEEDS.value:
      config = base.copy_and_resolve_references()
      config.method = method
      config.seed = int(seed)
      config.progress_bar = False
      config.update_from_flattened_dict(overrides)
      tag = "_".join([method, *(f"{k.split('.')[-1]}{v}" for k, v in overrides.items()),
                      f"seed{seed}"])
      print(f"== {tag}", flush=True)
      per_seed.append(run_one(config, os.path.join(_WORKDIR.value, tag)))
    rows.append((method, overrides, per_seed))

  levels = [lvl for lvl in ("conv", "fc", "mag_hidden")
            if any(lvl in r["probe"] for _, _, runs in rows for r in runs)]
  cmc_time = next((sum(r["seconds_per_step"] for r in runs) / len(runs)
                   for m, _, runs in rows if m == "cmc"), None)
  head = ["method", *(k for k in _parse_grid(_GRID.value)[0]),
          *(f"{lvl} acc (final)" for lvl in levels), "s / step"]
  if cmc_time:
    head.append("step time / cmc")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, overrides, runs in rows:
    cells = [method, *(f"{v:g}" if isinstance(v, float) else str(v) for v in overrides.values())]
    for lvl in levels:
      accs = [r["probe"][lvl]["test_acc"] for r in runs if lvl in r["probe"]]
      cells.append(_mean_std(accs) if accs else "–")
    sps = sum(r["seconds_per_step"] for r in runs) / len(runs)
    cells.append(f"{sps:.3f}")
    if cmc_time:
      cells.append(f"{sps / cmc_time:.2f}x")
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  seeds = ",".join(_SEEDS.value)
  paper = _paper_rows(base.dataset, _METHODS.value)
  print(f"\nlinear-probe top-1 test accuracy (%), final probe epoch; seeds {seeds}\n{table}\n"
        f"\n{paper}")
  if _OUT.value:
    command = "python " + shlex.join(sys.argv)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(f"# {os.path.basename(base.dataset)}: {', '.join(_METHODS.value)}\n\n"
              f"Command:\n\n```\n{command}\n```\n\nLinear-probe top-1 test accuracy (%) at the "
              f"final probe epoch, mean ± std over seeds {seeds}; s / step is the median "
              f"training step time after compilation on this machine.\n\n{table}\n\n"
              f"{paper}\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from metaug_jax import cli
  app.call_after_init(cli.quiet_library_logs)
  app.run(main)
