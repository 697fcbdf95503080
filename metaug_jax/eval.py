"""Restore for eval: python -m metaug_jax.eval --workdir=DIR [--config=... overrides].

Rebuilds the model from the config saved with the checkpoint (or from --config, which must
match it in every shape-relevant field), restores the newest (or --step / --config.eval.step)
checkpoint without touching the training state, and evaluates the frozen encoder (BatchNorm
in eval mode) two ways on features extracted once:
  * the linear probe (docs/metaug.md §7) on the conv / fc (/ mag_hidden) features;
  * the weighted kNN classifier (Wu et al. 2018; k = eval.knn_k, T = eval.knn_temperature) on
    the contrastive `embedding`, the training-free number InstDisc / MoCo / CMC report.
Both are printed as one markdown table and saved to DIR/eval_step_<step>.json.
"""

import json
import os

import sys

from absl import app, flags
from ml_collections import config_flags

from metaug_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config; default: the one saved with the checkpoint.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to evaluate (0: newest).")

KNN_FEATURES = "embedding"


def _one_line_mismatch(error: Exception, workdir: str) -> str:
  """check_compatible's multi-line message as one line, with the eval-specific fix."""
  lines = [l.strip() for l in str(error).splitlines()]
  diffs = [l for l in lines if l.startswith("config.")] or lines
  return (f"the checkpoint in {workdir} was trained with a different config ("
          f"{'; '.join(diffs)}); pass matching values, or leave out --config to use the "
          f"config saved with the checkpoint")


def extract_all_features(method, params, batch_stats, images, data_config, batch_size):
  """{level: (N, F) float32 numpy} of every level `method.features` returns (conv, fc,
  embedding and mag_hidden where present), in one jitted pass with params as arguments."""
  import jax
  import jax.numpy as jnp

  from metaug_jax.data import views as views_lib
  from metaug_jax.evaluation import monitor

  @jax.jit
  def features(p, s, batch):
    out = method.features(p, s, views_lib.make_eval_views(batch, data_config))
    return {k: v.astype(jnp.float32) for k, v in out.items()}

  return monitor.batched(lambda b: features(params, batch_stats, b), batch_size, images)


def probe_and_knn(exp, state) -> dict:
  """Linear probe of every probe level and kNN on the embedding of `state`'s frozen encoder.

  Returns {level: probe results (linear_probe.probe), ..., "knn": {features, dim, k,
  temperature, test_acc}}; accuracies in percent.
  """
  import jax

  from metaug_jax.evaluation import knn, linear_probe

  config, data = exp.config, exp.dataset
  if data.train_labels is None or data.test_labels is None:
    raise linear_probe.ProbeNeedsLabelsError(
        f"dataset {data.name!r} has no labels (or no labelled test set), so neither the "
        f"linear probe nor the kNN evaluation can run.")
  params, stats = jax.device_get((state.params, state.batch_stats))
  ec = config.eval
  train_f = extract_all_features(exp.method, params, stats, data.train_images, config.data,
                                 ec.batch_size)
  test_f = extract_all_features(exp.method, params, stats, data.test_images, config.data,
                                ec.batch_size)
  results = {}
  for level in linear_probe.LEVELS:
    if level in train_f:
      results[level] = linear_probe.probe(
          train_f[level], data.train_labels, test_f[level], data.test_labels,
          data.num_classes, epochs=ec.probe_epochs, lr=ec.probe_lr,
          batch_size=ec.probe_batch_size, weight_decay=ec.probe_weight_decay, seed=config.seed)
  results["knn"] = {
      "features": KNN_FEATURES, "dim": int(train_f[KNN_FEATURES].shape[1]),
      "k": int(ec.knn_k), "temperature": float(ec.knn_temperature),
      "test_acc": knn.knn_accuracy(train_f[KNN_FEATURES], data.train_labels,
                                   test_f[KNN_FEATURES], data.test_labels, data.num_classes,
                                   int(ec.knn_k), float(ec.knn_temperature))}
  return results


def format_table(results: dict, title: str) -> str:
  """One markdown table: a row per probe level, and the kNN row on the embedding."""
  knn = results.get("knn")
  knn_head = f"kNN acc (k={knn['k']}, T={knn['temperature']:g})" if knn else "kNN acc"
  lines = [title, f"| features | dim | probe acc (final) | probe acc (best epoch) | "
                  f"probe train acc | {knn_head} |", "|---|---|---|---|---|---|"]
  for level, r in results.items():
    if level != "knn":
      lines.append(f"| {level} | {r['dim']} | {r['test_acc']:.2f} | {r['best_test_acc']:.2f} "
                   f"| {r['train_acc']:.2f} | – |")
  if knn:
    lines.append(f"| {knn['features']} | {knn['dim']} | – | – | – | {knn['test_acc']:.2f} |")
  return "\n".join(lines)


def evaluate_workdir(workdir: str, config=None, step: int = 0) -> dict:
  """Restores a checkpoint of `workdir`, prints the probe + kNN table, returns the results.

  Args:
    workdir: a training workdir holding checkpoints/.
    config: None to use the config saved with the checkpoint; else a config whose
      shape-relevant fields must match it (CheckpointMismatchError, one line, otherwise).
    step: checkpoint step (0: config.eval.step, or the newest).

  Returns:
    probe_and_knn's dict; also written to workdir/eval_step_<step>.json (or
    probe_random_init.json with config.eval.random_init).
  """
  from metaug_jax import checkpoint as ckpt_lib
  from metaug_jax import config_base, train

  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  try:
    step = step or (config.eval.step if config is not None else 0) or None
    saved = ckpt.restore_config(step)
    if config is None:
      config = config_base.get_base_config()
      config.update_from_flattened_dict(_flatten(saved))
    else:
      try:
        ckpt_lib.check_compatible(saved, config, workdir)
      except ckpt_lib.CheckpointMismatchError as e:
        raise ckpt_lib.CheckpointMismatchError(_one_line_mismatch(e, workdir)) from None
    # Orbax has started JAX's backend: too late for (and no need of) training's XLA flags.
    exp = train.build_experiment(config, apply_xla_settings=False)
    if config.eval.random_init:
      state = exp.init_state()
      title = "linear probe and kNN, randomly initialised encoder"
    else:
      state = ckpt.restore_state(exp.abstract_state(), step)
      title = "linear probe and kNN"
  finally:
    ckpt.close()
  results = probe_and_knn(exp, state)
  print(format_table(results, f"{title} ({config.dataset}, {config.method}, "
                              f"step {int(state.step)})"), flush=True)
  name = ("probe_random_init.json" if config.eval.random_init
          else f"eval_step_{int(state.step)}.json")
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
  app.run(main, argv=cli.resolve_config_argument(sys.argv))
