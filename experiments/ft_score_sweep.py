"""Feature Transformation's sweep view: score-distribution curves across one swept field.

Trains one run per value of --field (same data, seed and budget) and draws every run's
score statistics (positive score mean / variance, negatives' mean / variance, before and
after the transformation; docs/feature_transformation.md §3) in one PNG, one colour per value:
the paper's stack of curves over MoCo's momentum.

  python experiments/ft_score_sweep.py --workdir=runs/ft_sweep \
      --field=moco.momentum --values=0.5,0.9,0.99,0.999 --steps=200

Runs already finished in --workdir are reused (their metrics.jsonl is read again), so an
interrupted sweep continues where it stopped. The PNG goes to --out (default
WORKDIR/score_stats_sweep.png).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/digits.py:moco_ft", "Config of every run (default: digits, moco_ft).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.")
_FIELD = flags.DEFINE_string("field", "moco.momentum", "The swept config field.")
_VALUES = flags.DEFINE_list("values", ["0.5", "0.9", "0.99", "0.999"], "Its values.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per run (0: the config's).")
_PROBE = flags.DEFINE_bool("probe", False, "Also run the linear probe after each run.")
_OUT = flags.DEFINE_string("out", "", "PNG path (default WORKDIR/score_stats_sweep.png).")

DONE_FILE = "sweep_done"


def run_config(base, field: str, value, steps: int, probe: bool):
  """`base` with `field` = value and the sweep's budget (plots and monitor off)."""
  config = base.copy_and_resolve_references()
  config.update_from_flattened_dict({field: value})
  if steps:
    config.num_train_steps = steps
    config.optim.lr_decay_epochs = ()
  config.log_every_steps = max(1, min(int(config.log_every_steps), max(1, steps // 50)))
  config.progress_bar = False
  config.eval.plots = False
  config.eval.monitor_every_steps = 0
  config.eval.probe_after_training = probe
  return config


def train_one(config, workdir: str) -> list:
  """Trains `config` in `workdir` unless done there already; returns its metric records."""
  from metaug_jax import train
  from metaug_jax.evaluation import plots
  if not os.path.exists(os.path.join(workdir, DONE_FILE)):
    train.train_and_evaluate(config, workdir)
    open(os.path.join(workdir, DONE_FILE), "w").close()
  return plots.read_jsonl(os.path.join(workdir, plots.METRICS_FILE))


def main(argv):
  del argv
  from metaug_jax.config_base import parse_literal
  from metaug_jax.evaluation import plots
  series, labels = [], []
  for text in _VALUES.value:
    value = parse_literal(text)
    config = run_config(_CONFIG.value, _FIELD.value, value, _STEPS.value, _PROBE.value)
    tag = f"{_FIELD.value.split('.')[-1]}{text}"
    print(f"== {_FIELD.value}={text}", flush=True)
    records = train_one(config, os.path.join(_WORKDIR.value, tag))
    series.append(plots.metric_series(records))
    labels.append(f"{_FIELD.value}={text}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "score_stats_sweep.png")
  path = plots.plot_score_stats(series, out, labels,
                                title=f"score distributions across {_FIELD.value} "
                                      f"({_CONFIG.value.method}, {_CONFIG.value.dataset})")
  if path is None:
    raise SystemExit(f"no run logged score statistics (is {_CONFIG.value.method!r} a method "
                     f"with a feature transformation?)")
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from metaug_jax import cli
  app.call_after_init(cli.quiet_library_logs)
  app.run(main)
