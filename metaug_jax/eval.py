"""Restore for eval: python -m metaug_jax.eval --workdir=DIR [--config=FILE] [overrides].

Rebuilds the model from the config saved with the checkpoint, with any --config.FIELD=value
overrides on top (or from --config=FILE, which must match it in every shape-relevant field),
restores the newest intact (or --step / --config.eval.step) checkpoint without touching the
training state (refused in one line when its arrays do not fit the config's), and evaluates
the frozen encoder (BatchNorm in eval mode) with the probes of evaluation/probes.py,
training's final probe, on features extracted once per split:
  * linear probes (docs/metaug.md §7) on the conv / fc (/ mag_hidden) features: all labels
    (eval.probe_augment: the paper's fresh crop/flip views per epoch), few labels
    (eval.few_label_fractions of each class, eval.few_label_draws draws), and the epoch chosen
    on a validation split of the training set (eval.val_fraction);
  * the weighted kNN classifier (Wu et al. 2018; k = eval.knn_k, T = eval.knn_temperature) on
    eval.knn_levels (the contrastive `embedding` and `fc`).
They are printed as one markdown table and saved to DIR/eval_step_<step>.json.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from metaug_jax import cli, config_base

# The base config is only the default so that --config.FIELD overrides parse without a file;
# without --config=FILE they apply on top of the config saved with the checkpoint.
_CONFIG = config_flags.DEFINE_config_file(
    "config", config_base.__file__, "Optional config file; default: the one saved with the "
    "checkpoint, with any --config.FIELD=value overrides on top.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to evaluate (0: the newest intact one).")

def mismatch_fix(config) -> str:
  """What a config mismatch's message advises: with --config, matching values; without, no
  overrides of the fields the checkpoint fixes."""
  if config is None:
    return "the checkpoint fixes these fields, so drop those --config overrides"
  return ("pass matching values, or leave out --config to use the config saved with the "
          "checkpoint")


def eval_config(saved: dict, workdir: str, config=None, overrides=None):
  """The config to evaluate a checkpoint with: `config` if given (its shape-relevant fields
  must match `saved`), else `saved` with `overrides` ({dotted field: value}) on top, which
  must leave those fields alone. A contradiction is a one-line CheckpointMismatchError."""
  from metaug_jax import checkpoint as ckpt_lib

  fix = mismatch_fix(config)
  if config is None:
    config = config_base.get_base_config()
    config.update_from_flattened_dict(ckpt_lib.flat_config(saved))
    config.update_from_flattened_dict(dict(overrides or {}))
  ckpt_lib.check_compatible(saved, config, workdir, fix)
  return config


def run_probes(exp, state) -> dict:
  """Every probe of `state`'s frozen encoder (probes.evaluate, training's final probe too):
  linear (all labels, few labels, validation-selected) per level and the kNN, on features
  extracted once per split over the experiment's devices."""
  import jax

  from metaug_jax.evaluation import probes

  probes.check_labels(exp.dataset)
  params, stats = jax.device_get((state.params, state.batch_stats))
  return probes.evaluate(exp.method, params, stats, exp.dataset, exp.config, exp.devices)


def evaluate_workdir(workdir: str, config=None, step: int = 0, overrides=None) -> dict:
  """Restores a checkpoint of `workdir`, prints the probes' table, returns the results.

  Args:
    workdir: a training workdir holding checkpoints/.
    config: None to use the config saved with the checkpoint; else a config whose
      shape-relevant fields must match it (CheckpointMismatchError, one line, otherwise).
    step: checkpoint step (0: eval.step, or the newest intact one, skipping damaged ones
      with a warning); a damaged `step` is a DamagedCheckpointError.
    overrides: {dotted field: value} put on top of the saved config when `config` is None
      (the CLI's --config.FIELD=value without --config).

  Returns:
    probes.evaluate's dict; also written to workdir/eval_step_<step>.json (or
    probe_random_init.json with config.eval.random_init).
  """
  from metaug_jax import checkpoint as ckpt_lib
  from metaug_jax import train

  overrides = dict(overrides or {})
  step = (step or overrides.get("eval.step") or (config.eval.step if config is not None else 0)
          or None)
  experiments = {}

  def experiment(saved: dict):
    """The experiment for a checkpoint's saved config, built once per distinct config."""
    key = json.dumps(saved, sort_keys=True)
    if key not in experiments:
      # Orbax has started JAX's backend: too late for (and no need of) training's XLA flags.
      experiments[key] = train.build_experiment(eval_config(saved, workdir, config, overrides),
                                                apply_xla_settings=False)
    return experiments[key]

  def target(saved: dict):
    exp = experiment(saved)
    if exp.config.eval.random_init:
      return None
    return ckpt_lib.Target(exp.abstract_state(), exp.config, mismatch_fix(config))

  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  try:
    found = ckpt.restore_intact(target, step, advice=(
        "leave out --step to evaluate the newest intact checkpoint" if step else
        "nothing to evaluate: train again with python -m metaug_jax.main"))
  finally:
    ckpt.close()
  if found.skipped:
    print(ckpt_lib.skipped_warning(found.skipped, f"evaluating step {found.step}"),
          file=sys.stderr, flush=True)
  exp = experiment(found.config)
  config = exp.config
  from metaug_jax.evaluation import probes

  if config.eval.random_init:
    state = exp.init_state()
    title = "linear probes and kNN, randomly initialised encoder"
  else:
    state = found.state
    title = "linear probes and kNN"
  results = run_probes(exp, state)
  print(probes.format_results(results, f"{title} ({config.dataset}, {config.method}, "
                                       f"step {int(state.step)})"), flush=True)
  from metaug_jax.evaluation import colour_probe  # eval.colour_probe: prints, writes its JSON
  colour_probe.run_if_enabled(exp, state, workdir)
  name = ("probe_random_init.json" if config.eval.random_init
          else f"eval_step_{int(state.step)}.json")
  with open(os.path.join(workdir, name), "w") as f:
    json.dump(results, f, indent=2)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  with cli.user_errors_as_messages():
    if flags.FLAGS["config"].present:  # a config file: it must match the checkpoint
      evaluate_workdir(_WORKDIR.value, _CONFIG.value, _STEP.value)
    else:                              # the saved config, with the overrides on top
      evaluate_workdir(_WORKDIR.value, None, _STEP.value,
                       overrides=config_flags.get_override_values(flags.FLAGS["config"]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main, argv=cli.resolve_config_argument(sys.argv), flags_parser=cli.parse_flags)
