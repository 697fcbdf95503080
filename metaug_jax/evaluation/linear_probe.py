"""Linear probes on frozen features (docs/metaug.md §7): softmax regression fitted with SGD.

The classifier is trained with SGD + momentum and a step decay shaped like the paper's (x0.2 at
1/2, 2/3 and 5/6 of the epochs; the paper: 30/40/50 of 60). Every fit records its accuracy on
its own training examples and on each evaluation set after every epoch, so one fit gives:

  * `full_probes`: all labels; the final-epoch test accuracy (our figure) and the best-epoch one
    (the paper's tables, which select the epoch on the test set: docs/metaug.md, decision A9);
  * `few_label_probes`: several stratified label draws of one size, fitted side by side (vmap);
  * `validation_selected_probes`: fitted on the training set minus a validation split, over a
    grid of learning rates and weight decays side by side; the (grid point, epoch) with the
    best validation accuracy is chosen by `select_on_validation`, which sees the validation
    accuracies only, and the test accuracy at that choice is reported.

Inputs of these three are standardised features (`standardiser`) of one or more levels, which
are zero-padded to one width and fitted side by side (one compilation per data shape, not per
level); accuracies are in percent.
`probe_augmented` is the paper's protocol: fresh augmented training views every epoch.
"""

import dataclasses
import functools
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaug_jax.evaluation import features as features_lib

LEVELS = ("conv", "fc", "mag_hidden")


class ProbeNeedsLabelsError(ValueError):
  """The dataset has no labels, so there is nothing for a linear probe to predict."""


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """The probe's optimisation (config.eval.probe_*)."""
  epochs: int
  lr: float
  weight_decay: float
  batch_size: int

  @classmethod
  def from_config(cls, eval_config) -> "ProbeSettings":
    return cls(epochs=int(eval_config.probe_epochs), lr=float(eval_config.probe_lr),
               weight_decay=float(eval_config.probe_weight_decay),
               batch_size=int(eval_config.probe_batch_size))


def standardiser(train_x: np.ndarray):
  """fn(x) -> float32 (x - mean) / (std + 1e-6) with the moments of `train_x` (features only,
  no labels: the whole unlabelled training set may set them)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  return lambda x: ((x - mean) / std).astype(np.float32)


def _optimizer(lr, weight_decay, epochs: int, steps_per_epoch: int):
  """SGD + momentum 0.9, lr x0.2 at 1/2, 2/3 and 5/6 of the epochs (paper: 30/40/50 of 60)."""
  boundaries = {int(epochs * f) * steps_per_epoch: 0.2 for f in (1 / 2, 2 / 3, 5 / 6)}
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(optax.piecewise_constant_schedule(lr, boundaries), momentum=0.9))


def _init(key, dim: int, num_classes: int) -> dict:
  """Weights N(0, 0.01^2), zero bias (docs/metaug.md, decision A12). Row i is drawn from
  fold_in(key, i), so the rows of a level's real features do not depend on how far it is
  zero-padded (`stack_levels`)."""
  rows = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (num_classes,)))
  return {"w": 0.01 * rows(jnp.arange(dim)), "b": jnp.zeros((num_classes,))}


def _correct(p, xs, ys):
  """How many of (xs, ys) the classifier gets right (a count, so accuracies are exact)."""
  return jnp.sum(jnp.argmax(xs @ p["w"] + p["b"], -1) == ys)


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


def _curves(x, y, evals, key, lr, weight_decay, *, num_classes, epochs, batch_size):
  """One fit of multinomial logistic regression: (epochs, 1 + len(evals)) counts of correct
  predictions on (x, y) and on each (x_e, y_e) of `evals`, after every epoch."""
  tx = _optimizer(lr, weight_decay, epochs, x.shape[0] // batch_size)
  params = _init(key, x.shape[1], num_classes)

  def epoch(carry, ekey):
    p, o = _sgd_epoch(tx, *carry, x, y, ekey, batch_size)
    return (p, o), jnp.stack([_correct(p, x, y)] + [_correct(p, xe, ye) for xe, ye in evals])

  _, accs = jax.lax.scan(epoch, (params, tx.init(params)), jax.random.split(key, epochs))
  return accs


# Which arguments of _curves a batch of fits of one level varies: the data (label draws of one
# size) or the optimiser's hyper-parameters (a grid on the same data). Each fit has its key.
_MAPPED_AXES = {"data": (0, 0, None, 0, None, None), "hyper": (None, None, None, 0, 0, 0)}


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size", "mapped"))
def _fits(x, y, evals, keys, lr, weight_decay, *, num_classes, epochs, batch_size, mapped):
  """_curves for several levels (leading axis of x and of each eval set's features) and, per
  level, several fits (vmap over `mapped`'s arguments): (levels, fits, epochs, 1 + evals).
  Levels and fits run side by side, so one compilation serves them all."""
  fit = functools.partial(_curves, num_classes=num_classes, epochs=epochs, batch_size=batch_size)
  per_level = jax.vmap(fit, in_axes=_MAPPED_AXES[mapped])
  level_axes = (0, None, tuple((0, None) for _ in evals), None, None, None)
  return jax.vmap(per_level, in_axes=level_axes)(x, y, evals, keys, lr, weight_decay)


def stack_levels(levels: Sequence[np.ndarray]) -> np.ndarray:
  """(L, ..., N, max D) float32: each level's (..., N, D) features zero-padded to the widest.

  A zero feature leaves the logits and every other weight's gradient unchanged, so a padded
  level is fitted as it would be alone (up to float summation order).
  """
  width = max(a.shape[-1] for a in levels)
  pad = lambda a: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
  return np.stack([pad(np.asarray(a, np.float32)) for a in levels])


def _percent(counts, n_fit: int, evals: tuple) -> np.ndarray:
  """Counts (..., 1 + len(evals)) of _fits as accuracies in percent (float64)."""
  sizes = np.array([n_fit] + [int(y.shape[0]) for _, y in evals], np.float64)
  return np.asarray(counts, np.float64) / sizes * 100


def _evals(*pairs) -> tuple:
  """((level-stacked features, labels), ...) of the evaluation sets, as device arrays."""
  return tuple((jnp.asarray(stack_levels(xs)), jnp.asarray(y, jnp.int32)) for xs, y in pairs)


def full_probes(xs: Sequence, y, xs_test: Sequence, y_test, num_classes: int,
                settings: ProbeSettings, seed: int) -> list:
  """All labels, one probe per level of `xs` (standardised (N, D_l) features, fitted side by
  side): [{test_acc (final epoch), best_test_acc (best epoch), train_acc, dim}]."""
  chex.assert_rank(list(xs) + list(xs_test), 2)
  n = xs[0].shape[0]
  evals = _evals((xs_test, y_test))
  counts = _fits(jnp.asarray(stack_levels([x[None] for x in xs])),
                 jnp.asarray(y, jnp.int32)[None], evals, jax.random.PRNGKey(seed)[None],
                 settings.lr, settings.weight_decay, num_classes=int(num_classes),
                 epochs=settings.epochs, batch_size=int(min(settings.batch_size, n)),
                 mapped="data")
  accs = _percent(counts[:, 0], n, evals)                # (levels, epochs, train / test)
  return [{"test_acc": float(a[-1, 1]), "best_test_acc": float(a[:, 1].max()),
           "train_acc": float(a[-1, 0]), "dim": int(x.shape[1])} for a, x in zip(accs, xs)]


def few_label_probes(xs: Sequence, y, xs_test: Sequence, y_test, num_classes: int,
                     subsets: Sequence[np.ndarray], settings: ProbeSettings, seed: int) -> list:
  """Per level of `xs`, one probe per label subset (all of one size, e.g.
  `splits.few_label_subset` draws), all fitted side by side: [{mean, std (over subsets,
  ddof 1), accs (final-epoch test acc per subset), examples (labels per subset)}]."""
  sizes = {len(s) for s in subsets}
  if len(sizes) != 1:
    raise ValueError(f"label subsets of one probe must have one size, got {sorted(sizes)}")
  size = sizes.pop()
  xs_sub = jnp.asarray(stack_levels([np.stack([x[s] for s in subsets]) for x in xs]))
  ys = jnp.asarray(np.stack([y[s] for s in subsets]), jnp.int32)
  keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed), d)
                    for d in range(len(subsets))])
  evals = _evals((xs_test, y_test))
  counts = _fits(xs_sub, ys, evals, keys, settings.lr, settings.weight_decay,
                 num_classes=int(num_classes), epochs=settings.epochs,
                 batch_size=int(min(settings.batch_size, size)), mapped="data")
  final = _percent(counts, size, evals)[:, :, -1, 1]    # (levels, subsets)
  return [{"mean": float(f.mean()), "std": float(f.std(ddof=1)) if f.size > 1 else 0.0,
           "accs": [float(a) for a in f], "examples": int(size)} for f in final]


def select_on_validation(val_accs: np.ndarray) -> tuple:
  """(grid index, epoch index) of the best validation accuracy in a (grid, epochs) array;
  ties go to the first grid point, then the earliest epoch. It sees validation accuracies
  only: the test set selects nothing."""
  val_accs = np.asarray(val_accs)
  chex.assert_rank(val_accs, 2)
  g, e = np.unravel_index(int(np.argmax(val_accs)), val_accs.shape)
  return int(g), int(e)


def validation_selected_probes(xs_fit: Sequence, y_fit, xs_val: Sequence, y_val,
                               xs_test: Sequence, y_test, num_classes: int,
                               settings: ProbeSettings, seed: int,
                               lrs: Sequence[float] = (),
                               weight_decays: Sequence[float] = ()) -> list:
  """Per level, probes fitted on (xs_fit, y_fit) for every (lr, weight decay) of the grid
  (empty: the settings' own); the grid point and epoch are chosen on validation accuracy
  (`select_on_validation`) and the test accuracy is reported there: [{test_acc, val_acc,
  epoch (1-based), lr, weight_decay, fit_examples, val_examples}]."""
  grid = [(float(lr), float(wd)) for lr in (lrs or (settings.lr,))
          for wd in (weight_decays or (settings.weight_decay,))]
  key = jax.random.PRNGKey(seed)
  n_fit = xs_fit[0].shape[0]
  evals = _evals((xs_val, y_val), (xs_test, y_test))
  counts = _fits(jnp.asarray(stack_levels(xs_fit)), jnp.asarray(y_fit, jnp.int32), evals,
                 jnp.stack([key] * len(grid)), jnp.asarray([g[0] for g in grid]),
                 jnp.asarray([g[1] for g in grid]), num_classes=int(num_classes),
                 epochs=settings.epochs, batch_size=int(min(settings.batch_size, n_fit)),
                 mapped="hyper")
  accs = _percent(counts, n_fit, evals)         # (levels, grid, epochs, train / val / test)
  out = []
  for level_accs, x_val in zip(accs, xs_val):
    g, e = select_on_validation(level_accs[:, :, 1])
    out.append({"test_acc": float(level_accs[g, e, 2]), "val_acc": float(level_accs[g, e, 1]),
                "epoch": e + 1, "lr": grid[g][0], "weight_decay": grid[g][1],
                "fit_examples": int(n_fit), "val_examples": int(x_val.shape[0])})
  return out


def probe(train_x, train_y, test_x, test_y, num_classes: int, *, epochs: int = 100,
          lr: float = 0.1, batch_size: int = 256, weight_decay: float = 1e-4,
          seed: int = 0) -> dict:
  """`full_probes` of one level of raw features, standardised with the training moments."""
  standardise = standardiser(train_x)
  return full_probes([standardise(train_x)], train_y, [standardise(test_x)], test_y,
                     num_classes, ProbeSettings(epochs, lr, weight_decay, batch_size), seed)[0]


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size", "lr", "weight_decay"))
def _augmented_epoch(params, opt, x, y, x_test, y_test, key, *, epochs, batch_size, lr,
                     weight_decay):
  """One epoch on this epoch's augmented features; returns the state and the train / test
  counts of correct predictions."""
  tx = _optimizer(lr, weight_decay, epochs, x.shape[0] // batch_size)
  params, opt = _sgd_epoch(tx, params, opt, x, y, key, batch_size)
  return params, opt, _correct(params, x, y), _correct(params, x_test, y_test)


def probe_augmented(extractor: features_lib.Extractor, params, batch_stats, dataset, config,
                    seed: int, clean: tuple) -> dict:
  """The paper's protocol (docs/metaug.md §7): every epoch the probe sees freshly augmented
  training views (random resized crop, flip) through the frozen encoder; test images are not
  augmented. `clean` holds the (train, test) eval-view features {level: (N, F)}; the
  standardisation statistics come from the clean training features. Returns full_probes'
  dict per level, with "augmented": True."""
  ec = config.eval
  settings = ProbeSettings.from_config(ec)
  key = jax.random.PRNGKey(seed)
  clean_train, clean_test = clean
  n = dataset.train_images.shape[0]
  batch_size = int(min(settings.batch_size, n))
  standardise = {k: standardiser(v) for k, v in clean_train.items()}
  test = {k: standardise[k](v) for k, v in clean_test.items()}
  y, y_test = dataset.train_labels.astype(np.int32), dataset.test_labels.astype(np.int32)
  tx = _optimizer(settings.lr, settings.weight_decay, settings.epochs, n // batch_size)
  state = {}
  for i, (k, v) in enumerate(clean_train.items()):
    p = _init(jax.random.fold_in(key, i), v.shape[1], dataset.num_classes)
    state[k] = (p, tx.init(p))
  history = {k: [] for k in clean_train}
  for epoch in range(settings.epochs):
    keys = features_lib.example_keys(jax.random.fold_in(key, 1000 + epoch), n)
    feats = extractor(params, batch_stats, dataset.train_images, keys=keys)
    for k in clean_train:
      p, o, train_correct, test_correct = _augmented_epoch(
          *state[k], standardise[k](feats[k]), y, test[k], y_test,
          jax.random.fold_in(key, 2000 + epoch), epochs=settings.epochs,
          batch_size=batch_size, lr=settings.lr, weight_decay=settings.weight_decay)
      state[k] = (p, o)
      history[k].append((int(train_correct) / n * 100, int(test_correct) / len(y_test) * 100))
  return {k: {"test_acc": h[-1][1], "best_test_acc": max(t for _, t in h),
              "train_acc": h[-1][0], "dim": int(clean_train[k].shape[1]), "augmented": True}
          for k, h in history.items()}
