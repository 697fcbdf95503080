"""What experiments/compare.py computes besides training: the run cache keys, the paired test
over seeds, the results tables and the provenance of a results file (no flags here, so tests
can import it).

A comparison is a list of rows, each a dict: label, method, grid (the grid's overrides of
the row), paper (its Table 1 numbers or None), runs (one result per seed: {"probe":
probes.evaluate's dict, "seconds_per_step": ...}) and floors (the same probes of the row's
architecture at random initialisation, per seed); the raw-pixel floor is a list of per-seed
results of probes.evaluate_pixels.
"""

import functools
import hashlib
import json
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


def floor_dir(exp, state) -> str:
  """A random-init floor's directory name under --workdir: method, seed and floor_key."""
  return f"floor_{exp.config.method}_seed{exp.config.seed}-{floor_key(exp, state)}"


def floor_key(exp, state) -> str:
  """The random-init floor's cache key: the method's class (its feature levels), the initial
  parameters and BatchNorm statistics (their bytes), the data, model and eval sections of the
  config, and the code version; the training fields do not enter."""
  import jax
  import numpy as np
  digest = hashlib.sha256()
  digest.update(f"{type(exp.method).__module__}.{type(exp.method).__qualname__}".encode())
  for leaf in jax.tree_util.tree_leaves(jax.device_get((state.params, state.batch_stats))):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  c = exp.config
  for part in (c.dataset, c.data_dir, c.data, c.model, c.eval, c.seed,
               code_version()):
    text = (part.to_json_best_effort(sort_keys=True)
            if hasattr(part, "to_json_best_effort") else str(part))
    digest.update(text.encode())
  return digest.hexdigest()[:10]


def row_config(base, method: str, seed: int, overrides: dict):
  """The resolved config of one run: the base config, the method's variant, the seed, then
  the row's and the grid's overrides."""
  from metaug_jax.methods import registry
  config = base.copy_and_resolve_references()
  registry.apply_variant(config, method)
  config.seed = int(seed)
  config.progress_bar = False
  config.update_from_flattened_dict(dict(overrides))
  return config


def run_dir(method: str, overrides: dict, seed: int, config) -> str:
  """A run's directory name under --workdir: its row, seed and run_key."""
  tag = "_".join([method, *(f"{k.split('.')[-1]}{v}" for k, v in overrides.items()),
                  f"seed{seed}"])
  return f"{tag}-{run_key(config)}"


def pixel_config(base, seed: int):
  """The config of the raw-pixel floor at one seed: the base config (no method variant, no
  grid) with that seed."""
  config = base.copy_and_resolve_references()
  config.seed = int(seed)
  return config


def pixel_dir(config) -> str:
  """The raw-pixel floor's directory name under --workdir."""
  return f"pixels_seed{config.seed}-{pixel_floor_key(config)}"


# The config fields that the raw-pixel floor depends on: the data and the probes, not the
# method or its training.
PIXEL_FLOOR_FIELDS = ("dataset", "data_dir", "download", "data", "eval", "seed")


def pixel_floor_key(config) -> str:
  """The cache key of a raw-pixel floor: PIXEL_FLOOR_FIELDS of the resolved config and the
  code version (one floor per data set, seed and probe protocol, shared by every row)."""
  fields = {name: config[name] for name in PIXEL_FLOOR_FIELDS}
  text = json.dumps(fields, sort_keys=True, default=lambda v: v.to_dict())
  return hashlib.sha256((text + code_version()).encode()).hexdigest()[:10]


def accuracies(runs: list, column: str, level: str) -> list:
  """Per-seed test accuracies of one probe column and level (None where a run lacks it)."""
  from metaug_jax.evaluation import probes
  return [probes.columns(r["probe"]).get((column, level)) for r in runs]


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
  # Differences equal up to float rounding leave the t statistic undefined, not infinite.
  if len(diff) >= 2 and np.ptp(diff) > 1e-9 * max(1.0, float(np.abs(diff).max())):
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


# ---- the results tables ------------------------------------------------------------------------


def provenance_footer(started: float, runs_seconds: float) -> str:
  """The last line of every results file: provenance, this command's wall time since
  `started`, and the runs' own wall time (`runs_seconds`, reused runs included)."""
  import time
  meta = provenance()
  return (f"Commit {meta['commit']} (code version {meta['code_version']}); {meta['versions']}; "
          f"{meta['device']}. Wall time of this command {(time.time() - started) / 60:.1f} "
          f"min; the runs' own wall time (training, probes and floors, including runs reused "
          f"from an earlier invocation) {runs_seconds / 60:.1f} min.")


def write_results(out: str, title: str, body: str) -> None:
  """A results file: the title, the exact command that made it, then `body`."""
  import shlex
  import sys
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(f"# {title}\n\nCommand:\n\n```\npython {shlex.join(sys.argv)}\n```\n\n{body}")


def probe_columns(runs: list, kinds=None) -> list:
  """The probe columns present in any of `runs`, in table order; `kinds` (e.g. ["linear",
  "few_label"]) keeps only those kinds (few_label: every fraction)."""
  from metaug_jax.evaluation import probes
  names = {c for r in runs for c, _ in probes.columns(r["probe"])}
  return [n for n in probes.column_order(names) if not kinds or n.split(":")[0] in kinds]


def run_levels(runs: list, levels=None) -> list:
  """The feature levels present in any of `runs`, in table order; `levels` keeps only those
  (the raw-pixel floor's `pixels` is always kept)."""
  from metaug_jax.evaluation import probes
  found = {lvl for r in runs for _, lvl in probes.columns(r["probe"])}
  return [l for l in probes.level_order(found) if not levels or l in levels
          or l == probes.PIXELS]


def same_floors(groups: list) -> list:
  """[(labels, grid, runs)] from [(label, grid, runs)]: groups whose per-seed results are
  identical (the same architecture initialised with the same seeds) merged into one, their
  labels listed together."""
  from metaug_jax.evaluation import probes
  merged = {}
  for label, grid, runs in groups:
    key = json.dumps([grid, [sorted((f"{c} {l}", v) for (c, l), v in
                                    probes.columns(r["probe"]).items()) for r in runs]],
                     sort_keys=True, default=str)
    merged.setdefault(key, ([], grid, runs))[0].append(label)
  return list(merged.values())


def _grid_cells(grid: dict) -> list:
  return [f"{v:g}" if isinstance(v, float) else str(v) for v in grid.values()]


def _protocol(rows: list) -> dict:
  return next((r["probe"].get("protocol", {}) for row in rows for r in row["runs"]), {})


def results_table(rows: list, pixel_runs: list, grid_keys: list, kinds=None,
                  levels=None) -> str:
  """Every row x level with every probe column (mean ± std over seeds), the step time, then
  the floors: random init (rows with identical floors merged) and raw pixels."""
  from metaug_jax.evaluation import probes, tables
  everything = [r for row in rows for r in row["runs"] + row["floors"]] + pixel_runs
  cols, protocol = probe_columns(everything, kinds), _protocol(rows)
  head = ["row", *grid_keys, "features", *(probes.column_title(c, protocol) for c in cols),
          "s / step"]
  cmc = [r["seconds_per_step"] for row in rows if row["label"] in ("cmc", "CMC")
         for r in row["runs"]]
  if cmc:
    head.append("step time / cmc")
  body = []

  def lines(label, grid, runs, step_cells):
    for i, level in enumerate(run_levels(runs, levels)):
      body.append([label, *_grid_cells(grid), level,
                   *(tables.mean_std(accuracies(runs, c, level)) for c in cols),
                   *(step_cells if i == 0 else [""] * len(step_cells))])

  for row in rows:
    sps = sum(r["seconds_per_step"] for r in row["runs"]) / len(row["runs"])
    lines(row["label"], row["grid"], row["runs"],
          [f"{sps:.3f}"] + ([f"{sps / (sum(cmc) / len(cmc)):.2f}x"] if cmc else []))
  none = [tables.MISSING] * (2 if cmc else 1)
  for labels, grid, runs in same_floors([(row["label"], row["grid"], row["floors"])
                                         for row in rows]):
    lines(f"floor: random init ({', '.join(labels)})", grid, runs, none)
  if pixel_runs:
    lines("floor: raw pixels", {k: "" for k in grid_keys}, pixel_runs, none)
  return tables.markdown_table(head, body)


def _test_cell(test: dict) -> str:
  """'+1.23 (p=0.012, 4/5)': mean difference, p-value, seeds where the row is ahead."""
  if not test["n"]:
    return "–"
  p = "p=–" if test["p"] is None else f"p={test['p']:.3g}"
  return f"{test['mean_diff']:+.2f} ({p}, {test['wins']}/{test['n']})"


def tests_table(rows: list, baseline: str, grid_keys: list, kinds=None, levels=None) -> str:
  """Paired differences (by seed) of every row and every random-init floor to the baseline
  row with the same grid overrides, per level and probe column ('' without a baseline)."""
  from metaug_jax.evaluation import probes, tables
  if not baseline:
    return ""
  def baseline_runs(grid):
    return next((row["runs"] for row in rows
                 if baseline in (row["label"], row["method"]) and row["grid"] == grid), None)
  cols = probe_columns([r for row in rows for r in row["runs"]], kinds)
  head = ["row", *grid_keys, "features",
          *(f"{probes.column_title(c, _protocol(rows))} vs {baseline}" for c in cols)]
  floors = [(f"floor: random init ({', '.join(labels)})", grid, runs)
            for labels, grid, runs in same_floors([(row["label"], row["grid"], row["floors"])
                                                   for row in rows])]
  body = []
  for label, grid, runs in [(r["label"], r["grid"], r["runs"]) for r in rows] + floors:
    base = baseline_runs(grid)
    if runs is base or base is None:
      continue
    for level in run_levels(runs, levels):
      body.append([label, *_grid_cells(grid), level,
                   *(_test_cell(paired_test(accuracies(runs, c, level),
                                            accuracies(base, c, level))) for c in cols)])
  caption = (f"Paired by seed against {baseline}: mean difference in points (two-sided paired "
             f"t-test p-value, seeds where the row is ahead / seeds):")
  return caption + "\n\n" + tables.markdown_table(head, body)


# ---- the papers' numbers -----------------------------------------------------------------------


def ours_cell(runs: list) -> str:
  """'conv / fc' of our full-label linear probe, means over seeds (for the reference tables)."""
  from metaug_jax.evaluation import tables
  cells = []
  for level in ("conv", "fc"):
    values = [v for v in accuracies(runs, "linear", level) if v is not None]
    cells.append(tables.number(sum(values) / len(values) if values else None))
  return " / ".join(cells)


def _paper_cell(numbers: dict, dataset: str) -> str:
  from metaug_jax.evaluation import tables
  if dataset not in numbers:
    return ""
  return " / ".join(tables.number(v) for v in numbers[dataset])


def paper_table(rows: list, dataset: str) -> str:
  """MetAug's Table 1 numbers (conv / fc) for the rows that have them, every Table 1 data set
  (empty where none); with a column of ours when this comparison ran on one of them."""
  from metaug_jax.evaluation import tables
  from metaug_jax.methods import registry
  if not any(row["paper"] for row in rows):
    return ""
  sets = list(registry.TABLE1_DATASETS)
  head = ["row", *sets] + ([f"ours on {dataset}"] if dataset in sets else [])
  first = {}
  for row in rows:                  # one line per row label (a grid repeats them)
    if row["paper"] or dataset in sets:   # elsewhere a row without numbers would be empty
      first.setdefault(row["label"], row)
  body = [[label, *(_paper_cell(row["paper"] or {}, d) for d in sets)]
          + ([ours_cell(row["runs"])] if dataset in sets else []) for label, row in first.items()]
  return tables.markdown_table(
      head, body, "Paper (Li et al. 2022, Table 1; 300 epochs, best probe epoch), conv / fc:\n")


def other_papers_table(rows: list, dataset: str) -> str:
  """The rows that the compared methods register from other papers (e.g. the Feature
  Transformation paper's ImageNet numbers of moco_ft, and MoCo v2's beside them), conv / fc
  as reported, with a column of ours where this comparison ran on their data set."""
  from metaug_jax.evaluation import tables
  from metaug_jax.methods import registry
  methods = list(dict.fromkeys(row["method"] for row in rows))
  entries = [(name, r) for name in methods for r in registry.get(name).paper_rows
             if r.source != registry.TABLE1_SOURCE]
  if not entries:
    return ""
  sets = list(dict.fromkeys(d for _, r in entries for d in r.numbers))
  ours = {}
  for row in rows:
    ours.setdefault(row["method"], ours_cell(row["runs"]))
  head = ["row", "method", "source", *sets] + ([f"ours on {dataset}"] if dataset in sets else [])
  body = [[r.label, name, r.source, *(_paper_cell(r.numbers, d) for d in sets)]
          + ([ours.get(name, "")] if dataset in sets else []) for name, r in entries]
  return tables.markdown_table(
      head, body, f"Numbers reported by other papers, conv / fc as reported (– where a paper "
                  f"gives one figure); ours: not run on these data sets unless a column says "
                  f"so (this comparison: {dataset}):\n")
