"""The feature-augmentation study (docs/feature_augmentation.md §6): the grid placement x op x
loss family of the FA module against each family's plain method, paired by seed.

A family is a plain method and its FA version (moco / moco_fa, simclr / simclr_fa, cmc /
cmc_fa and metaug_oucl_only / oucl_fa: instance discrimination with InfoNCE, NT-Xent and
OUCL; byol / byol_fa and simsiam / simsiam_fa: instance similarity). For
each family the plain method and one FA row per grid cell are trained with every seed by
experiments/compare.py's `run_one` (a run is cached under a key of its resolved config and the
library's code, so an interrupted study continues where it stopped), the random-init probe of
the family's architecture is measured by `floor_one`, and every FA row is tested against the
plain method with compare's paired test over seeds. One table per family goes to --out, after
the command, with a section for the reading of hypotheses H1-H4.

  # the study the docs describe (Fashion-MNIST 10k subset, 3 seeds, both paradigms):
  python experiments/fa_study.py --config=configs/fashion_mnist.py --workdir=runs/fa_study \
      --config.data_dir=/usr/share/datasets/fashion-mnist \
      --config.data.max_train_examples=10000 --seeds=0,1,2 \
      --out=experiments/results/fa_study.md
  # a smoke run: two cells, one seed, the seconds-long :tiny config
  python experiments/fa_study.py --config=configs/digits.py:tiny --workdir=/tmp/fa_smoke \
      --families=simsiam --placements=projector --ops=noise,dropout --seeds=0 --out=/tmp/s.md

A cell is (family, placement, op). Its side and gradient-flow policy is the first of
--policies that the FA method accepts for it (its registry check), or, with
--all_policies, one row for each accepted policy (hypothesis H2); placements a family lacks
(the predictor of MoCo and SimCLR) and cells no policy makes valid are listed as skipped.
compare.py's --grid ('fa.noise_std=0.01,0.1;...') multiplies the FA rows by other FA settings
(hypotheses H1 and H3), and --extra sets fields of every row, plain ones included (H4: weak
data augmentation). compare.py's --methods and --baseline do not apply here.
"""

import itertools
import os
import sys
import time

from absl import app, flags

import compare  # experiments/compare.py: its flags --config, --workdir, --seeds, --grid, --out
from comparison import (accuracies, paired_test, provenance_footer, run_dir,
                        write_results)

FLAGS = flags.FLAGS

FAMILIES = {   # name: (plain method, FA method, paradigm)
    "moco": ("moco", "moco_fa", "instance discrimination"),
    "simclr": ("simclr", "simclr_fa", "instance discrimination"),
    "byol": ("byol", "byol_fa", "instance similarity"),
    "simsiam": ("simsiam", "simsiam_fa", "instance similarity"),
    "cmc": ("cmc", "cmc_fa", "instance discrimination"),
    "oucl": ("metaug_oucl_only", "oucl_fa", "instance discrimination"),
}
# Named (side, gradient-flow policy) pairs of the FA module (docs/feature_augmentation.md §3.1).
POLICIES = {
    "target_only": {"fa.side": "target", "fa.grad_policy": "detach_output"},
    "online_only": {"fa.side": "online", "fa.grad_policy": "through"},
    "both_through": {"fa.side": "both", "fa.grad_policy": "through"},
    "target_through": {"fa.side": "target", "fa.grad_policy": "through"},
    "detach_input": {"fa.side": "target", "fa.grad_policy": "detach_input"},
}

_FAMILIES = flags.DEFINE_list("families", ["moco", "simsiam"],
                              f"Families to study, of {', '.join(FAMILIES)}.")
_PLACEMENTS = flags.DEFINE_list("placements", ["backbone", "projector", "predictor"],
                                "fa.placement values of the grid.")
_OPS = flags.DEFINE_list("ops", ["noise", "dropout", "intra_mix", "inter_mix", "learned"],
                         "fa.op values of the grid.")
_POLICIES = flags.DEFINE_list("policies", ["target_only", "online_only", "both_through"],
                              f"Named policies in order of preference, of {', '.join(POLICIES)}.")
_ALL_POLICIES = flags.DEFINE_bool("all_policies", False,
                                  "One row per accepted policy instead of the first accepted.")
_EXTRA = flags.DEFINE_string("extra", "", "'field=value;...' set on every row (plain included).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the rows and the number of runs only.")


def base_config(method: str, seed: int, overrides: dict):
  """compare.py's row config: the method's variant, then the seed and `overrides`."""
  from metaug_jax.methods import registry
  config = FLAGS.config.copy_and_resolve_references()
  registry.apply_variant(config, method)
  config.seed = int(seed)
  config.progress_bar = False
  config.update_from_flattened_dict(overrides)
  return config


def plan(extra: dict, sweep: list) -> tuple[list, list]:
  """(rows, skipped): rows are (family, label, method, overrides, cell) with cell a dict of
  the row's FA settings (empty for the plain method); skipped are (family, cell, reason)."""
  from metaug_jax.methods import registry
  rows, skipped = [], []
  for family in _FAMILIES.value:
    plain, fa_method, paradigm = FAMILIES[family]
    rows.append((family, plain, plain, dict(extra), {}))
    for placement, op in itertools.product(_PLACEMENTS.value, _OPS.value):
      cell = {"placement": placement, "op": op}
      accepted, refusals = [], []
      for name in _POLICIES.value:
        overrides = {**extra, "fa.placement": placement, "fa.op": op, **POLICIES[name]}
        reasons = registry.get(fa_method).check(base_config(fa_method, 0, overrides))
        if reasons:
          refusals.append((name, reasons[0]))
          continue
        accepted.append((name, overrides))
        if not _ALL_POLICIES.value:
          break
      if not accepted:   # each distinct reason once, after the policies it refused
        reasons = {}
        for name, reason in refusals:
          reasons.setdefault(reason, []).append(name)
        skipped.append((family, cell, " / ".join(f"{', '.join(names)}: {reason}"
                                                 for reason, names in reasons.items())))
      for (name, overrides), more in itertools.product(accepted, sweep):
        rows.append((family, fa_method, fa_method, {**overrides, **more},
                     {**cell, "policy": name, **more}))
  return rows, skipped


def _mean_std(values: list, digits: int = 2) -> str:
  import numpy as np
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def final_monitors(workdir: str) -> dict:
  """The run's monitors at its last logged step: `copy_cosine`, the FA copies' cosine to
  their originals (mean over the `fa_copy_cosine_*` names: H1), and `z_std`, the collapse
  monitor `projection_std_per_dim` (H2); None where the run does not log one."""
  from metaug_jax.evaluation import plots
  last = {k: float(values[-1]) for k, (_, values) in
          plots.metric_series(plots.read_jsonl(os.path.join(workdir, plots.METRICS_FILE))).items()}
  cosines = [v for k, v in last.items() if k.startswith("fa_copy_cosine_")]
  return {"copy_cosine": sum(cosines) / len(cosines) if cosines else None,
          "z_std": last.get("projection_std_per_dim")}


def _test_cell(test: dict) -> str:
  """'+1.23 (p=0.012, 2/3)' (compare.py's format)."""
  if not test["n"]:
    return "–"
  p = "p=–" if test["p"] is None else f"p={test['p']:.3g}"
  return f"{test['mean_diff']:+.2f} ({p}, {test['wins']}/{test['n']})"


def family_table(family: str, rows: list, floors: list, sweep_keys: list) -> str:
  """The markdown table of one family from its (row, runs), the plain method first: the
  floor, the plain method, then every FA row with its paired difference to the plain method
  per feature level."""
  levels = [lvl for lvl in ("conv", "fc")
            if any(lvl in r["probe"].get("linear", {}) for _, runs in rows for r in runs)]
  plain_runs = rows[0][1]
  head = ["row", "placement", "op", "policy", *sweep_keys,
          *(f"{lvl} acc" for lvl in levels), *(f"{lvl} vs plain" for lvl in levels),
          "copy cosine", "z std", "s / step"]
  lines = [f"### {family} ({FAMILIES[family][2]}): {FAMILIES[family][0]} vs "
           f"{FAMILIES[family][1]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  blank = ["–"] * (3 + len(sweep_keys))
  lines.append("| random-init floor | " + " | ".join(blank) + " | " +
               " | ".join(_mean_std(accuracies(floors, "linear", lvl)) for lvl in levels) +
               " | " +
               " | ".join("–" for _ in levels) + " | – | – | – |")
  for row, runs in rows:
    cell = row[4]
    cells = [row[1], *(str(cell.get(k, "–")) for k in ("placement", "op", "policy")),
             *(f"{cell[k]:g}" if isinstance(cell.get(k), float) else str(cell.get(k, "–"))
               for k in sweep_keys)]
    cells += [_mean_std(accuracies(runs, "linear", lvl)) for lvl in levels]
    cells += ["–" if runs is plain_runs else
              _test_cell(paired_test(accuracies(runs, "linear", lvl),
                                     accuracies(plain_runs, "linear", lvl)))
              for lvl in levels]
    cells += [_mean_std([r.get("monitors", {}).get(m) for r in runs], 3)
              for m in ("copy_cosine", "z_std")]
    cells.append(f"{sum(r['seconds_per_step'] for r in runs) / len(runs):.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


READING = """## How to read it

For each hypothesis (docs/feature_augmentation.md §5): held, did not hold, or undecided at this
budget, with the rows and p-values it rests on (the reading is written below the tables by
whoever ran the study).

- **H1** (copies must stay close to their originals; strong FA hurts): rows of one op across
  strengths (`--grid=fa.noise_std=...` or `fa.dropout_rate`, `fa.mix_alpha`), beside the copies'
  cosine to their originals (`fa_copy_cosine_*` in each run's metrics.jsonl).
- **H2** (instance similarity: copies only as stop-gradient targets or on the online side):
  the byol / simsiam rows of policies target_only and online_only against both_through
  (`--all_policies`), and the collapse monitor `projection_std_per_dim` in metrics.jsonl.
- **H3** (instance discrimination: copies help as extra positives, little as extra negatives):
  the moco / simclr rows with `--grid=fa.usage=extra_positive,extra_negative`.
- **H4** (FA complements data augmentation and cannot replace it): this study against the same
  command with weak data augmentation (`--extra=...`); FA's gain should be larger there, and
  no FA row with weak augmentation should reach the plain method with the standard one.
"""


def main(argv):
  del argv
  from metaug_jax.config_base import parse_literal
  for name in ("methods", "baseline"):
    if FLAGS[name].present:
      raise app.UsageError(f"--{name} is compare.py's; the study's rows come from --families, "
                           f"--placements, --ops and --policies")
  unknown = [f for f in _FAMILIES.value if f not in FAMILIES] + \
            [p for p in _POLICIES.value if p not in POLICIES]
  if unknown:
    raise app.UsageError(f"unknown families or policies: {', '.join(unknown)}")
  if not FLAGS.seeds:
    raise app.UsageError("--seeds is empty: pass at least one seed, e.g. --seeds=0,1,2")
  started = time.time()
  extra = {k.strip(): parse_literal(v) for k, v in
           (part.split("=", 1) for part in filter(None, _EXTRA.value.split(";")))}
  sweep = compare._parse_grid(FLAGS.grid)  # pylint: disable=protected-access
  sweep_keys = list(sweep[0])
  rows, skipped = plan(extra, sweep)
  seeds = FLAGS.seeds
  workdir = FLAGS.workdir
  print(f"{len(rows)} rows x {len(seeds)} seeds = {len(rows) * len(seeds)} runs, plus "
        f"{len(_FAMILIES.value) * len(seeds)} random-init floors; {len(skipped)} cells skipped",
        flush=True)
  for family, label, _, overrides, _ in rows:
    print(f"  {family}: {label} {overrides}")
  for family, cell, reason in skipped:
    print(f"  skipped {family} {cell}: {reason}")
  if _DRY_RUN.value:
    return

  results, floors = [], {}
  for family, label, method, overrides, _ in rows:
    runs = []
    for seed in seeds:
      config = base_config(method, seed, overrides)
      name = run_dir(label, {k: v for k, v in overrides.items() if k not in extra}, seed, config)
      print(f"== {name}", flush=True)
      run = compare.run_one(config, os.path.join(workdir, name))
      runs.append({**run, "monitors": final_monitors(run["run_dir"])})
    results.append(runs)
  for family in _FAMILIES.value:
    plain = FAMILIES[family][0]
    floors[family] = []
    for seed in seeds:
      floors[family].append(compare.floor_one(base_config(plain, seed, extra), workdir))

  tables = "\n\n".join(
      family_table(f, [(row, runs) for row, runs in zip(rows, results) if row[0] == f],
                   floors[f], sweep_keys) for f in _FAMILIES.value)
  skipped_text = "\n".join(f"- {f} {c['placement']} x {c['op']}: {why}"
                           for f, c, why in skipped) or "- none"
  trained = sum(r.get("wall_seconds", 0.0) for runs in results for r in runs) + \
      sum(r.get("wall_seconds", 0.0) for runs in floors.values() for r in runs)
  footer = provenance_footer(started, trained)
  config = FLAGS.config
  everywhere = f"; every row also has {_EXTRA.value}" if extra else ""
  text = (f"Linear-probe top-1 test accuracy (%) at the final probe epoch, mean ± std over "
          f"seeds {','.join(seeds)} ({config.dataset}, {config.model.encoder}); 'vs plain' is "
          f"the mean per-seed difference to the family's plain method in points (two-sided "
          f"paired t-test p-value, seeds where the FA row is ahead / seeds); the floor is the "
          f"probe of the random-init encoder; s / step the median step time after "
          f"compilation; 'copy cosine' the FA copies' mean cosine to their originals "
          f"and 'z std' the collapse monitor (per-dimension std of the l2-normalised projection, "
          f"about 1/sqrt(dim) when healthy, 0 when collapsed), both at the last logged training "
          f"step, mean ± std over seeds. FA settings not in the table are the `fa` defaults "
          f"(docs/feature_augmentation.md §3.1){everywhere}."
          f"\n\n{tables}\n\nSkipped cells:\n\n{skipped_text}\n\n{READING}\n{footer}\n")
  print("\n" + text)
  if FLAGS.out:
    write_results(FLAGS.out, f"Feature augmentation study: {', '.join(_FAMILIES.value)} on "
                             f"{config.dataset}", text)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from metaug_jax import cli
  app.call_after_init(cli.quiet_library_logs)
  app.run(main)
