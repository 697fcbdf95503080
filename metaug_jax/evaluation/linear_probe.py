"""Linear probe on frozen features (docs/metaug.md §7): conv and fc levels, encoders in eval mode.

Features are extracted once with BatchNorm running statistics (the encoders are frozen), then
a softmax classifier is trained on them with SGD + momentum and a step decay shaped like the
paper's (x0.2 at 1/2, 2/3 and 5/6 of the epochs; the paper: 30/40/50 of 60). Both the
final-epoch and the best-epoch test accuracy are reported; the paper's tables use the best
epoch (test-set selection, docs/metaug.md, decision A9), so the final one is the honest number.
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
                     batch_size: int = 256, augment_key: Optional[jax.Array] = None,
                     levels: Optional[tuple] = LEVELS) -> dict:
  """{level: (N, F) float32 numpy} for every level in `levels` the method exposes (None:
  every one, the kNN's `embedding` included).

  With `augment_key`, the images go through the training views (random crop, flip, ...) with
  per-batch keys folded from it, as the paper's probe does for its training set; else through
  the deterministic eval views.
  """

  @jax.jit
  def features(p, s, batch, key):  # parameters as arguments, not baked-in constants
    if augment_key is None:
      views = views_lib.make_eval_views(batch, data_config)
    else:
      views = views_lib.make_train_views(key, batch, data_config)
    out = method.features(p, s, views)
    return {k: v.astype(jnp.float32) for k, v in out.items() if levels is None or k in levels}

  n = images.shape[0]
  chunks = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    pad = batch_size - batch.shape[0]
    if pad:  # keep one compiled shape
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    key = jax.random.fold_in(augment_key if augment_key is not None
                             else jax.random.PRNGKey(0), start)
    out = jax.device_get(features(params, batch_stats, batch, key))
    chunks.append({k: v[:batch_size - pad] for k, v in out.items()})
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _optimizer(lr: float, weight_decay: float, epochs: int, steps_per_epoch: int):
  """SGD + momentum 0.9, lr x0.2 at 1/2, 2/3 and 5/6 of the epochs (paper: 30/40/50 of 60)."""
  boundaries = {int(epochs * f) * steps_per_epoch: 0.2 for f in (1 / 2, 2 / 3, 5 / 6)}
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(optax.piecewise_constant_schedule(lr, boundaries), momentum=0.9))


def _init(key, dim: int, num_classes: int) -> dict:
  """Weights N(0, 0.01^2), zero bias (docs/metaug.md, decision A12)."""
  return {"w": 0.01 * jax.random.normal(key, (dim, num_classes)), "b": jnp.zeros((num_classes,))}


def _accuracy(p, xs, ys):
  return jnp.mean(jnp.argmax(xs @ p["w"] + p["b"], -1) == ys)


def _sgd_epoch(tx, params, opt, x, y, key, batch_size: int):
  """One shuffled pass of minibatch SGD on softmax cross-entropy."""
  steps = x.shape[0] // batch_size
  perm = jax.random.permutation(key, x.shape[0])[:steps * batch_size].reshape(steps,
                                                                              batch_size)

  def loss_fn(p, xb, yb):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb))

  def step(carry, idx):
    p, o = carry
    updates, o = tx.update(jax.grad(loss_fn)(p, x[idx], y[idx]), o, p)
    return (optax.apply_updates(p, updates), o), None

  (params, opt), _ = jax.lax.scan(step, (params, opt), perm)
  return params, opt


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(x, y, x_test, y_test, key, *, num_classes, epochs, batch_size, lr, weight_decay):
  """Multinomial logistic regression on fixed features; per-epoch train/test accuracies."""
  tx = _optimizer(lr, weight_decay, epochs, x.shape[0] // batch_size)
  params = _init(key, x.shape[1], num_classes)

  def epoch(carry, ekey):
    p, o = _sgd_epoch(tx, *carry, x, y, ekey, batch_size)
    return (p, o), (_accuracy(p, x, y), _accuracy(p, x_test, y_test))

  (params, _), (train_acc, test_acc) = jax.lax.scan(
      epoch, (params, tx.init(params)), jax.random.split(key, epochs))
  return train_acc, test_acc


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size", "lr", "weight_decay"))
def _augmented_epoch(params, opt, x, y, x_test, y_test, key, *, epochs, batch_size, lr,
                     weight_decay):
  """One epoch on this epoch's augmented features; returns state and train/test accuracy."""
  tx = _optimizer(lr, weight_decay, epochs, x.shape[0] // batch_size)
  params, opt = _sgd_epoch(tx, params, opt, x, y, key, batch_size)
  return params, opt, _accuracy(params, x, y), _accuracy(params, x_test, y_test)


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


def evaluate(method, params, batch_stats, dataset, config, seed: Optional[int] = None,
             features: Optional[tuple] = None) -> dict:
  """Linear-probe accuracies of every feature level: {level: {test_acc, best_test_acc, ...}},
  by the protocol the config names (eval.probe_augment: the paper's augmented one).

  `features`: the (train, test) eval-view features, when the caller has them already
  (restore-for-eval extracts them once for the probe and the kNN); levels not in LEVELS are
  left out.
  """
  if dataset.train_labels is None or dataset.test_labels is None:
    raise ProbeNeedsLabelsError(
        f"dataset {dataset.name!r} has no labels (or no labelled test set), so the linear "
        f"probe cannot run. Give the data class sub-folders (folder) or a 'y' array (npz), "
        f"or pass --config.eval.probe_after_training=False to only pre-train.")
  ec = config.eval
  if features is None:
    extract = functools.partial(extract_features, method, params, batch_stats,
                                data_config=config.data, batch_size=ec.batch_size)
    features = (extract(dataset.train_images), extract(dataset.test_images))
  train, test = ({k: v for k, v in f.items() if k in LEVELS} for f in features)
  if ec.get("probe_augment", False):
    return probe_augmented(method, params, batch_stats, dataset, config,
                           config.seed if seed is None else seed, clean=(train, test))
  results = {}
  for level in train:
    results[level] = probe(train[level], dataset.train_labels, test[level], dataset.test_labels,
                           dataset.num_classes, epochs=ec.probe_epochs, lr=ec.probe_lr,
                           batch_size=ec.probe_batch_size, weight_decay=ec.probe_weight_decay,
                           seed=config.seed if seed is None else seed)
  return results


def probe_augmented(method, params, batch_stats, dataset, config, seed: int,
                    clean: Optional[tuple] = None) -> dict:
  """The paper's protocol (docs/metaug.md §7): every epoch the probe sees freshly augmented training
  views (random resized crop, flip) through the frozen encoder; test images are not augmented.
  Standardisation statistics come from the un-augmented training features (`clean`: the
  (train, test) eval-view features if already extracted)."""
  ec = config.eval
  key = jax.random.PRNGKey(seed)
  extract = functools.partial(extract_features, method, params, batch_stats,
                              data_config=config.data, batch_size=ec.batch_size)
  clean, test = clean or (extract(dataset.train_images), extract(dataset.test_images))
  n = dataset.train_images.shape[0]
  batch_size = int(min(ec.probe_batch_size, n))
  moments = {k: (v.mean(0), v.std(0) + 1e-6) for k, v in clean.items()}
  standardise = lambda k, a: ((a - moments[k][0]) / moments[k][1]).astype(np.float32)
  test = {k: standardise(k, v) for k, v in test.items()}
  y, y_test = dataset.train_labels.astype(np.int32), dataset.test_labels.astype(np.int32)
  tx = _optimizer(ec.probe_lr, ec.probe_weight_decay, ec.probe_epochs, n // batch_size)
  state = {}
  for i, (k, v) in enumerate(clean.items()):
    p = _init(jax.random.fold_in(key, i), v.shape[1], dataset.num_classes)
    state[k] = (p, tx.init(p))
  history = {k: [] for k in clean}
  for epoch in range(ec.probe_epochs):
    feats = extract(dataset.train_images, augment_key=jax.random.fold_in(key, 1000 + epoch))
    for k in clean:
      p, o, train_acc, test_acc = _augmented_epoch(
          *state[k], standardise(k, feats[k]), y, test[k], y_test,
          jax.random.fold_in(key, 2000 + epoch), epochs=ec.probe_epochs, batch_size=batch_size,
          lr=ec.probe_lr, weight_decay=ec.probe_weight_decay)
      state[k] = (p, o)
      history[k].append((float(train_acc) * 100, float(test_acc) * 100))
  return {k: {"test_acc": h[-1][1], "best_test_acc": max(t for _, t in h),
              "train_acc": h[-1][0], "dim": int(clean[k].shape[1]), "augmented": True}
          for k, h in history.items()}


def format_table(results: dict, title: str = "linear probe") -> str:
  """A small markdown table: one row per feature level."""
  lines = [f"{title}", "| features | dim | test acc (final) | test acc (best epoch) | train acc |",
           "|---|---|---|---|---|"]
  for level, r in results.items():
    lines.append(f"| {level} | {r['dim']} | {r['test_acc']:.2f} | {r['best_test_acc']:.2f} | "
                 f"{r['train_acc']:.2f} |")
  return "\n".join(lines)
