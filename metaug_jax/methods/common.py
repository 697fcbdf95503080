"""What every method shares: the train state, optimisers, schedules and the view/encode step."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from metaug_jax import parallel
from metaug_jax.data import views as views_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays that orbax saves as is.

  `params`/`batch_stats`/`opt_state` are dicts keyed by part ("encoder", and "mag" for
  MetAug). `banks` is the (V, N, D) memory-bank array, or None for methods without one.
  `rng` is the run's base key; step keys are `fold_in(rng, step)` so a resumed run draws the
  same randomness as an uninterrupted one.
  """
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: dict
  banks: Optional[jax.Array]
  rng: jax.Array


def step_keys(state: TrainState, names: tuple[str, ...]) -> dict:
  """Named keys for this step, identical on every device."""
  key = jax.random.fold_in(state.rng, state.step)
  return dict(zip(names, jax.random.split(key, len(names))))


def augmenter_key(state: TrainState) -> jax.Array:
  """This step's key for the feature augmenter, independent of the step's other keys (adding
  an augmenter to a method leaves the views and negatives it draws unchanged)."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x0A06)


def encoder_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Step decay: lr x decay_rate after each epoch in lr_decay_epochs (docs/metaug.md §5.4)."""
  boundaries = {int(e) * steps_per_epoch: config.optim.lr_decay_rate
                for e in config.optim.lr_decay_epochs}
  return optax.piecewise_constant_schedule(config.optim.lr, boundaries)


def sgd_with_coupled_decay(learning_rate, momentum: float, weight_decay: float):
  """PyTorch SGD semantics: L2 added to the gradient, on all parameters (docs/metaug.md,
  decision A12)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None))


def encoder_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  return sgd_with_coupled_decay(encoder_lr_schedule(config, steps_per_epoch),
                                config.optim.momentum, config.optim.weight_decay)


def train_views(images: jax.Array, key: jax.Array, data_config) -> tuple:
  """Augmented views of this device's uint8 batch, keyed by each example's global position."""
  keys = parallel.example_keys(key, images.shape[0])
  return views_lib.make_train_views_from_keys(keys, images, data_config)


def apply_encoder(model, params, batch_stats, views, *, update_stats: bool = True):
  """Train-mode forward of a multi-view module; returns (outputs, new batch_stats).

  With update_stats=False the running statistics computed by this forward are discarded
  (the virtual forward of the meta step, docs/metaug.md, decision A10); normalisation still
  uses batch stats.
  """
  outputs, mutated = model.apply({"params": params, "batch_stats": batch_stats}, views,
                                 train=True, mutable=["batch_stats"])
  new_stats = mutated["batch_stats"] if update_stats else batch_stats
  return outputs, new_stats


def embeddings(outputs) -> list:
  return [o["embedding"] for o in outputs]


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of a pytree (gradients, updates)."""
  return optax.tree.norm(tree)


def score_stats(pos: jax.Array, neg: jax.Array, prefix: str = "") -> dict:
  """Positive / negative score statistics, comparable across methods
  (docs/contrastive_baselines.md §9)."""
  return {f"{prefix}pos_mean": jnp.mean(pos), f"{prefix}pos_std": jnp.std(pos),
          f"{prefix}neg_mean": jnp.mean(neg), f"{prefix}neg_std": jnp.std(neg)}
