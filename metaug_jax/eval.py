"""Restore for eval: python -m metaug_jax.eval --workdir=DIR [--config=... overrides].

Rebuilds the model from the config saved with the checkpoint (or from --config, which must
match it), restores the newest (or --config.eval.step) checkpoint without touching the
training state, and runs the linear probe on the frozen conv / fc features.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from metaug_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config; default: the one saved with the checkpoint.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to evaluate (0: newest).")


def evaluate_workdir(workdir: str, config=None, step: int = 0) -> dict:
  """Restores a checkpoint of `workdir` and returns the linear-probe results."""
  from metaug_jax import checkpoint as ckpt_lib
  from metaug_jax import config_base, train

  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  step = step or (config.eval.step if config is not None else 0) or None
  saved = ckpt.restore_config(step)
  if config is None:
    config = config_base.get_base_config()
    config.update_from_flattened_dict(_flatten(saved))
  else:
    ckpt_lib.check_compatible(saved, config, workdir)
  exp = train.build_experiment(config)
  if config.eval.random_init:
    state = exp.init_state()
    title = "linear probe, randomly initialised encoder"
  else:
    state = ckpt.restore_state(exp.abstract_state(), step)
    title = "linear probe"
  ckpt.close()
  results = train.evaluate_state(exp, state, None, title)
  name = "probe_random_init.json" if config.eval.random_init else f"eval_step_{int(state.step)}.json"
  with open(os.path.join(workdir, name), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _flatten(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists back to tuples (configs use tuples)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  with cli.user_errors_as_messages():
    evaluate_workdir(_WORKDIR.value, _CONFIG.value, _STEP.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
