"""The meta-gradient study's table (experiments/meta_gradient_study.py), free of flags so
that tests import it: the probes per row, the paired difference to each row's reference, the
MAG gradient's second-order / direct ratio read from the run's metrics, the step time."""

import json
import os

import comparison  # experiments/comparison.py

# (probe column, feature level) shown for each row.
COLUMNS = (("linear", "conv"), ("linear", "fc"), ("few_label:0.01", "fc"), ("knn", "embedding"))


def second_order_ratio(workdir: str):
  """Median over the logged steps of |second-order part| / |direct part| of the MAG gradient
  (None for a method without generators)."""
  ratios = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("mag_grad_direct_norm"):
        ratios.append(record["mag_grad_second_order_norm"] / record["mag_grad_direct_norm"])
  return sorted(ratios)[len(ratios) // 2] if ratios else None


def column_values(runs: list, column: tuple) -> list:
  """Per-seed accuracies of one (probe column, level) of probes.columns."""
  from metaug_jax.evaluation import probes
  return [probes.columns(run["probe"]).get(column) for run in runs]


def column_title(column: tuple) -> str:
  kind, level = column
  return {"linear": f"linear {level}", "few_label:0.01": f"1 % labels {level}",
          "knn": f"kNN {level}"}[kind]


def study_table(names: list, plan: dict, results: dict, floors: dict, pixels: list) -> str:
  """One row per study row (and the floors): probes as mean ± std, the paired difference to
  the reference row per column, the second-order / direct ratio and the step time."""
  from metaug_jax.evaluation import tables
  head = ["row", "overrides", *(column_title(c) for c in COLUMNS), "reference",
          *(f"{column_title(c)} vs reference" for c in COLUMNS),
          "2nd-order / direct", "s / step"]
  body = []
  for name in names:
    method, overrides, reference = plan[name]
    runs = results[name]
    ref_runs = results.get(reference)  # a reference row not run: no test
    ratios = [r["second_order_ratio"] for r in runs if r.get("second_order_ratio") is not None]
    body.append([
        name, ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "–",
        *(tables.mean_std(column_values(runs, c)) for c in COLUMNS),
        reference or "–",
        *((comparison._test_cell(comparison.paired_test(  # pylint: disable=protected-access
            column_values(runs, c), column_values(ref_runs, c))) if ref_runs else "–")
          for c in COLUMNS),
        f"{sum(ratios) / len(ratios):.2g}" if ratios else "–",
        f"{sum(r['seconds_per_step'] for r in runs) / len(runs):.3f}"])
  blanks = ["–"] * (1 + len(COLUMNS) + 2)
  merged = {}   # architectures whose floors agree in every shown column: one line
  for method, runs in floors.items():
    key = str([column_values(runs, c) for c in COLUMNS])
    merged.setdefault(key, ([], runs))[0].append(method)
  bottom = [(f"floor: random init ({', '.join(methods)})", runs, None)
            for methods, runs in merged.values()]
  for label, runs, level in bottom + [("floor: raw pixels", pixels, "pixels")]:
    # The raw-pixel floor has one level: its value stands in every column of its kind.
    body.append([label, "–", *(tables.mean_std(column_values(runs, (c[0], level or c[1])))
                               for c in COLUMNS), *blanks])
  return tables.markdown_table(head, body)
