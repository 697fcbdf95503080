"""Issue 17's diagnostics: kNN of a trained vs the initial encoder at every feature level and
BN mode, and the training loss around epoch boundaries (experiments/results/
fashion_mnist_diagnostics.md has the commands and the numbers).

COMMAND: python experiments/fmnist_diagnostics.py --workdir=runs/fmd_cmc --variant=cmc \
  --set data.max_train_examples=5000 --set num_epochs=6
Trains with configs/fashion_mnist.py:VARIANT and the `--set KEY=VALUE` overrides (per-step
metrics in WORKDIR/metrics.jsonl), then writes WORKDIR/diagnostics.json: kNN accuracy (k, T of
config.eval) of the initial and the final parameters on `conv`, `fc`, `projection` and
`embedding`, with BatchNorm in eval mode (running averages) and in train mode (the batch's own
statistics), views concatenated and view 0 alone; and the loss / positive / negative scores of
the last steps of each epoch next to the first steps of the next one.
"""

import argparse
import ast
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import fashion_mnist  # noqa: E402
from metaug_jax import train  # noqa: E402
from metaug_jax.evaluation import features, knn  # noqa: E402

LEVELS = ("conv", "fc", "projection", "embedding")
EDGE_STEPS = 3   # steps on each side of an epoch boundary in the summary


def _set(config, assignment: str) -> None:
  """Applies one KEY=VALUE override (VALUE a Python literal, else a string)."""
  key, _, value = assignment.partition("=")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  node = config
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  node[last] = value


def feature_fn(method, train_mode_bn: bool):
  """A features.FeatureFn: {level: (B, V, F)} of the encoder on the given views.

  train_mode_bn normalises with the batch's own statistics (as in a training forward) instead
  of the running averages: BatchNorm's batch axis is the extractor's device axis, so the
  statistics are those of the whole (padded) extraction batch on any number of devices.
  """

  def per_view(outs):
    return {lvl: jnp.stack([o[lvl] for o in outs], axis=1) for lvl in LEVELS}

  def feats(params, stats, views):
    variables = {"params": params["encoder"], "batch_stats": stats["encoder"]}
    if not train_mode_bn:
      return per_view(method.encoder.apply(variables, tuple(views), train=False))
    outs, _ = method.encoder.apply(variables, tuple(views), train=True, mutable=["batch_stats"])
    return per_view(outs)

  return feats


def knn_table(exp, params, stats, memory, test) -> dict:
  """kNN accuracy for every (BN mode, level, views) of one parameter set."""
  ec, data = exp.config.eval, exp.dataset
  table = {}
  for bn in ("eval", "train"):
    extract = features.Extractor(feature_fn(exp.method, bn == "train"), exp.config.data,
                                 int(ec.batch_size), exp.devices)
    fm = extract(params, stats, memory[0])
    ft = extract(params, stats, test[0])
    for lvl in LEVELS:
      for views, sl in (("all", slice(None)), ("view0", slice(0, 1))):
        m = fm[lvl][:, sl].reshape(len(memory[0]), -1)
        t = ft[lvl][:, sl].reshape(len(test[0]), -1)
        table[f"{bn}_bn/{lvl}/{views}"] = knn.knn_accuracy(
            m, memory[1], t, test[1], data.num_classes, int(ec.knn_k), float(ec.knn_temperature))
    emb = ft["embedding"][:, 0]
    table[f"{bn}_bn/embedding_test_mean_cos"] = float(np.mean(emb @ emb.T))
  return table


def epoch_edges(metrics_path: str, steps_per_epoch: int) -> list:
  """Mean loss / pos_mean / neg_mean of the last EDGE_STEPS steps of each epoch and of the
  first EDGE_STEPS of the next one."""
  rows = {}
  with open(metrics_path) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r or "loss_total" in r:
        rows[r["step"]] = r
  out = []
  last = max(rows)
  for boundary in range(steps_per_epoch, last, steps_per_epoch):
    before = [rows[s] for s in range(boundary - EDGE_STEPS + 1, boundary + 1) if s in rows]
    after = [rows[s] for s in range(boundary + 1, boundary + EDGE_STEPS + 1) if s in rows]
    if not before or not after:
      continue
    mean = lambda rs, k: float(np.mean([r.get(k, np.nan) for r in rs]))
    loss_key = "loss" if "loss" in before[0] else "loss_total"
    out.append({"epoch": boundary // steps_per_epoch,
                **{f"{k}_{side}": mean(rs, k2)
                   for k, k2 in (("loss", loss_key), ("pos", "pos_mean"), ("neg", "neg_mean"))
                   for side, rs in (("end", before), ("start", after))}})
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variant", default="cmc")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  parser.add_argument("--knn_examples", type=int, default=2000,
                      help="labelled train (memory) and test images of the kNN")
  args = parser.parse_args(argv)
  config = fashion_mnist.get_config(args.variant)
  config.data_dir = "/usr/share/datasets/fashion-mnist"
  config.log_every_steps = 1
  config.checkpoint_every_steps = 10 ** 9
  config.progress_bar = False
  config.eval.plots = False
  for a in args.set:
    _set(config, a)
  exp = train.build_experiment(config)
  rng = np.random.default_rng(0)
  data = exp.dataset
  mi = np.sort(rng.permutation(len(data.train_images))[:args.knn_examples])
  ti = np.sort(rng.permutation(len(data.test_images))[:args.knn_examples])
  memory = (data.train_images[mi], data.train_labels[mi].astype(np.int32))
  test = (data.test_images[ti], data.test_labels[ti].astype(np.int32))
  init = jax.device_get(exp.init_state())
  t0 = time.time()
  exp, state = train.train(config, args.workdir, exp)
  wall = time.time() - t0
  final = jax.device_get(state)
  result = {"variant": args.variant, "overrides": args.set, "steps": int(final.step),
            "steps_per_epoch": exp.loader.steps_per_epoch, "train_wall_s": round(wall, 1),
            "knn_init": knn_table(exp, init.params, init.batch_stats, memory, test),
            "knn_final": knn_table(exp, final.params, final.batch_stats, memory, test),
            "epoch_edges": epoch_edges(os.path.join(args.workdir, "metrics.jsonl"),
                                       exp.loader.steps_per_epoch)}
  with open(os.path.join(args.workdir, "diagnostics.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
