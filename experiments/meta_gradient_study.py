"""Does MetAug's meta step matter? (docs/metaug.md §5: the MAGs' gradient through the virtual
inner update of the encoder.)

Rows, paired by seed (same data order, initial keys and probe label draws):
  cmc                        the contrastive baseline MetAug builds on
  oucl_only                  MetAug's loss (OUCL) without generators
  metaug                     full MetAug, paper order (the virtual step from the updated theta)
  metaug_first_order         the same with metaug.first_order=True: the inner gradient is a
                             constant, so the MAGs get only the direct part of their gradient
  metaug_fused               the virtual step from the current theta (one encoder pass fewer)
  metaug_large               full MetAug with a large inner learning rate alpha and large loss
                             weights (--large_*), where the second-order part is not negligible
  metaug_large_first_order   the same, first order

Each row shows the probes (all-label linear on conv / fc, 1 % labels on fc, kNN on the
embedding) as mean ± std over seeds, the paired difference to its reference row (two-sided
paired t-test), the ratio of the MAG gradient's second-order part to its direct part (the
median over the run's logged steps of `mag_grad_second_order_norm / mag_grad_direct_norm`,
averaged over seeds), and the step time. Runs, floors and the raw-pixel floor are
experiments/compare.py's, cached under the same keys, so rows it already trained are reused.

  python experiments/meta_gradient_study.py --config=configs/fashion_mnist.py \
      --workdir=runs/fm --config.data_dir=/usr/share/datasets/fashion-mnist \
      --config.data.max_train_examples=10000 --seeds=0,1,2,3,4 \
      --out=experiments/results/meta_gradient_study.md
  # a smoke run on the seconds-long digits config
  python experiments/meta_gradient_study.py --config=configs/digits.py:tiny \
      --workdir=/tmp/mg --seeds=0 --rows=metaug,metaug_first_order --out=/tmp/mg.md
"""

import os
import sys
import time

from absl import app, flags

import compare  # experiments/compare.py: its flags --config, --workdir, --seeds, --out
import comparison
from meta_gradient_report import second_order_ratio, study_table

FLAGS = flags.FLAGS

_ROWS = flags.DEFINE_list(
    "rows", ["cmc", "oucl_only", "metaug", "metaug_first_order", "metaug_fused",
             "metaug_large", "metaug_large_first_order"], "Rows of the study, in order.")
_LARGE_INNER_LR = flags.DEFINE_float("large_inner_lr", 0.1, "alpha of the *_large rows.")
_LARGE_LAMBDA_AUG = flags.DEFINE_float("large_lambda_aug", 0.1,
                                       "metaug.lambda_aug of the *_large rows.")
_LARGE_LAMBDA_MI = flags.DEFINE_float("large_lambda_mi", -1.0,
                                      "metaug.lambda_mi of the *_large rows (<0: the config's).")

def row_plan() -> dict:
  """{row: (method, overrides, reference row or None)} for every known row."""
  large = {"metaug.inner_lr": _LARGE_INNER_LR.value,
           "metaug.lambda_aug": _LARGE_LAMBDA_AUG.value}
  if _LARGE_LAMBDA_MI.value >= 0:
    large["metaug.lambda_mi"] = _LARGE_LAMBDA_MI.value
  return {
      "cmc": ("cmc", {}, None),
      "oucl_only": ("metaug_oucl_only", {}, "cmc"),
      "metaug": ("metaug", {}, "cmc"),
      "metaug_first_order": ("metaug", {"metaug.first_order": True}, "metaug"),
      "metaug_fused": ("metaug", {"metaug.virtual_step_from": "current"}, "metaug"),
      "metaug_large": ("metaug", large, "cmc"),
      "metaug_large_first_order": ("metaug", {**large, "metaug.first_order": True},
                                   "metaug_large"),
  }


def main(argv):
  del argv
  for name in ("methods", "baseline", "grid"):
    if FLAGS[name].present:
      raise app.UsageError(f"--{name} is compare.py's; this study's rows come from --rows")
  plan = row_plan()
  unknown = [r for r in _ROWS.value if r not in plan]
  if unknown:
    raise app.UsageError(f"--rows: unknown {', '.join(unknown)}; use any of "
                         f"{', '.join(plan)}")
  if not FLAGS.seeds:
    raise app.UsageError("--seeds is empty: pass at least one seed, e.g. --seeds=0,1,2,3,4")
  started = time.time()
  names = _ROWS.value
  base, seeds, workdir = FLAGS.config, FLAGS.seeds, FLAGS.workdir
  print(f"{len(names)} rows x {len(seeds)} seeds = {len(names) * len(seeds)} runs", flush=True)
  results, floors = {}, {}
  for name in names:
    method, overrides, _ = plan[name]
    runs = []
    for seed in seeds:
      config = comparison.row_config(base, method, seed, overrides)
      run_dir = os.path.join(workdir, comparison.run_dir(method, overrides, seed, config))
      print(f"== {name} seed {seed}: {run_dir}", flush=True)
      run = dict(compare.run_one(config, run_dir))
      run["second_order_ratio"] = second_order_ratio(run["run_dir"])
      runs.append(run)
    results[name] = runs
  for method in dict.fromkeys(plan[name][0] for name in names):
    # One random-init floor per architecture and seed (compare.py's cache key ignores the
    # training fields, so the *_large rows share metaug's).
    floors[method] = [compare.floor_one(comparison.row_config(base, method, seed, {}), workdir)
                      for seed in seeds]
  pixels = []
  for seed in seeds:
    config = comparison.pixel_config(base, seed)
    pixels.append(compare.pixel_floor(config, os.path.join(workdir,
                                                           comparison.pixel_dir(config))))

  table = study_table(names, plan, results, floors, pixels)
  own = sum(r.get("wall_seconds", 0.0) for runs in results.values() for r in runs)
  config = base
  text = (f"Test accuracy (%) of the probes of the final encoder, mean ± std over seeds "
          f"{','.join(seeds)} ({config.dataset}, {config.model.encoder}, "
          f"{config.num_train_steps} steps of batch {config.batch_size}); 'vs reference' is "
          f"the mean per-seed difference to the reference row in points (two-sided paired "
          f"t-test p-value, seeds where the row is ahead / seeds); '2nd-order / direct' the "
          f"median over logged steps of the norm of the MAG gradient's second-order part over "
          f"its direct part; s / step the median step time after compilation.\n\n{table}\n\n"
          f"{comparison.provenance_footer(started, own)}\n")
  print("\n" + text)
  if FLAGS.out:
    comparison.write_results(FLAGS.out, f"Does the meta step matter? MetAug's meta-gradient on "
                                        f"{config.dataset}", text)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from metaug_jax import cli
  app.call_after_init(cli.quiet_library_logs)
  app.run(main)
