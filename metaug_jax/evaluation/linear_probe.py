"""Linear probe on frozen features (spec section 7): conv and fc levels, encoders in eval mode.

Features are extracted once with BatchNorm running statistics (the encoders are frozen), then
a softmax classifier is trained on them with SGD + momentum and a step decay shaped like the
paper's (x0.2 at 1/2, 2/3 and 5/6 of the epochs; the paper: 30/40/50 of 60). Both the
final-epoch and the best-epoch test accuracy are reported; the paper's tables use the best
epoch (selection on the test set, spec A9), so the final one is the honest number.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaug_jax.data import views as views_lib

LEVELS = ("conv", "fc", "mag_hidden")


class ProbeNeedsLabelsError(ValueError):
  """The dataset has no labels, so there is nothing for a linear probe to predict."""


def extract_features(method, params, batch_stats, images: np.ndarray, data_config,
                     batch_size: int = 256) -> dict:
  """{level: (N, F) float32 numpy} for every level the method exposes."""

  @jax.jit
  def features(p, s, batch):  # parameters as arguments, not baked-in constants
    views = views_lib.make_eval_views(batch, data_config)
    out = method.features(p, s, views)
    return {k: v.astype(jnp.float32) for k, v in out.items() if k in LEVELS}

  n = images.shape[0]
  chunks = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    pad = batch_size - batch.shape[0]
    if pad:  # keep one compiled shape
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    out = jax.device_get(features(params, batch_stats, batch))
    chunks.append({k: v[:batch_size - pad] for k, v in out.items()})
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(x, y, x_test, y_test, key, *, num_classes, epochs, batch_size, lr, weight_decay):
  """Multinomial logistic regression by minibatch SGD; returns per-epoch test accuracies."""
  n, dim = x.shape
  steps = n // batch_size
  boundaries = {int(epochs * f) * steps: 0.2 for f in (1 / 2, 2 / 3, 5 / 6)}
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(optax.piecewise_constant_schedule(lr, boundaries), momentum=0.9))
  params = {"w": 0.01 * jax.random.normal(key, (dim, num_classes)),
            "b": jnp.zeros((num_classes,))}

  def loss_fn(p, xb, yb):
    logits = xb @ p["w"] + p["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  def accuracy(p, xs, ys):
    return jnp.mean(jnp.argmax(xs @ p["w"] + p["b"], -1) == ys)

  def epoch(carry, ekey):
    p, opt = carry
    perm = jax.random.permutation(ekey, n)[:steps * batch_size].reshape(steps, batch_size)

    def step(c, idx):
      p, opt = c
      g = jax.grad(loss_fn)(p, x[idx], y[idx])
      upd, opt = tx.update(g, opt, p)
      return (optax.apply_updates(p, upd), opt), None

    (p, opt), _ = jax.lax.scan(step, (p, opt), perm)
    return (p, opt), (accuracy(p, x, y), accuracy(p, x_test, y_test))

  (params, _), (train_acc, test_acc) = jax.lax.scan(
      epoch, (params, tx.init(params)), jax.random.split(key, epochs))
  return train_acc, test_acc


def probe(train_x, train_y, test_x, test_y, num_classes: int, *, epochs: int = 100,
          lr: float = 0.1, batch_size: int = 256, weight_decay: float = 1e-4,
          seed: int = 0) -> dict:
  """Fits the probe on standardised features; accuracies in percent."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standardise = lambda a: ((a - mean) / std).astype(np.float32)
  batch_size = int(min(batch_size, train_x.shape[0]))
  train_acc, test_acc = _fit(standardise(train_x), train_y.astype(np.int32),
                             standardise(test_x), test_y.astype(np.int32),
                             jax.random.PRNGKey(seed), num_classes=num_classes, epochs=epochs,
                             batch_size=batch_size, lr=lr, weight_decay=weight_decay)
  train_acc, test_acc = np.asarray(train_acc) * 100, np.asarray(test_acc) * 100
  return {"test_acc": float(test_acc[-1]), "best_test_acc": float(test_acc.max()),
          "train_acc": float(train_acc[-1]), "dim": int(train_x.shape[1])}


def evaluate(method, params, batch_stats, dataset, config, seed: Optional[int] = None) -> dict:
  """Linear-probe accuracies of every feature level: {level: {test_acc, best_test_acc, ...}}."""
  if dataset.train_labels is None or dataset.test_labels is None:
    raise ProbeNeedsLabelsError(
        f"dataset {dataset.name!r} has no labels (or no labelled test set), so the linear "
        f"probe cannot run. Give the data class sub-folders (folder) or a 'y' array (npz), "
        f"or pass --config.eval.probe_after_training=False to only pre-train.")
  ec = config.eval
  train = extract_features(method, params, batch_stats, dataset.train_images, config.data,
                           ec.batch_size)
  test = extract_features(method, params, batch_stats, dataset.test_images, config.data,
                          ec.batch_size)
  results = {}
  for level in train:
    results[level] = probe(train[level], dataset.train_labels, test[level], dataset.test_labels,
                           dataset.num_classes, epochs=ec.probe_epochs, lr=ec.probe_lr,
                           batch_size=ec.probe_batch_size, weight_decay=ec.probe_weight_decay,
                           seed=config.seed if seed is None else seed)
  return results


def format_table(results: dict, title: str = "linear probe") -> str:
  """A small markdown table: one row per feature level."""
  lines = [f"{title}", "| features | dim | test acc (final) | test acc (best epoch) | train acc |",
           "|---|---|---|---|---|"]
  for level, r in results.items():
    lines.append(f"| {level} | {r['dim']} | {r['test_acc']:.2f} | {r['best_test_acc']:.2f} | "
                 f"{r['train_acc']:.2f} |")
  return "\n".join(lines)
