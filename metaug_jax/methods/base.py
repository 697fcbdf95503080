"""The method interface: build models and optimisers, init a state, one pure train step.

A method is constructed from the config and the data facts it needs; `train_step` is the
function that `parallel.pmap_step` maps over devices. New methods (the sibling
feature-augmentation methods) subclass `Method` and override `_init_extra` / `train_step`.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metaug_jax import feature_aug, memory_bank, parallel
from metaug_jax.methods import common
from metaug_jax.models import encoders


@dataclasses.dataclass(frozen=True)
class DataFacts:
  """What a method must know about the data before it can build its state."""
  view_channels: tuple[int, ...]   # channels of each view
  bank_size: int                   # number of pre-training examples (memory-bank rows)
  steps_per_epoch: int
  global_batch: int


class Method:
  """Base: a multi-view encoder trained with an optax SGD; subclasses define the loss."""

  uses_bank = False
  code_exact_banks = False  # raw U(-s, s) bank rows, as the authors (MetAug's bank.schedule)

  def __init__(self, config: ml_collections.ConfigDict, facts: DataFacts):
    self.config = config
    self.facts = facts
    self.num_views = len(facts.view_channels)
    self.encoder = encoders.MultiViewEncoder(
        model_config=config.model, num_views=self.num_views,
        share=bool(config.model.share_encoder), axis_name="batch")
    self.encoder_tx = common.encoder_optimizer(config, facts.steps_per_epoch)
    self.augmenter = self.build_augmenter()

  def build_augmenter(self) -> feature_aug.FeatureAugmenter:
    """The feature augmenter applied to every ContrastBatch this method builds
    (docs/feature_augmentation.md); the plain methods use the identity."""
    return feature_aug.Identity()

  def augment(self, state: common.TrainState, key: jax.Array, batch: feature_aug.ContrastBatch):
    """`self.augmenter` applied to one ContrastBatch, with its params/state from the train
    state (params["augmenter"], batch_stats["augmenter"]; empty when it has none)."""
    out, _, metrics = feature_aug.apply_augmenter(
        self.augmenter, state.params.get("augmenter", {}), state.batch_stats.get("augmenter", {}),
        key, batch, state.step)
    return out, metrics

  # ---- state ---------------------------------------------------------------------------------
  def init(self, rng: jax.Array, sample_views: Sequence[jax.Array]) -> common.TrainState:
    """A fresh state; `sample_views` only fixes shapes (any small batch of eval views)."""
    init_key, bank_key, extra_key, run_key = jax.random.split(rng, 4)
    variables = self.encoder.init(init_key, tuple(sample_views), train=False)
    params = {"encoder": variables["params"]}
    stats = {"encoder": variables.get("batch_stats", {})}
    opt_state = {"encoder": self.encoder_tx.init(variables["params"])}
    banks = None
    if self.uses_bank:
      banks = memory_bank.init_banks(bank_key, self.num_views, self.facts.bank_size,
                                     self.config.model.embedding_dim,
                                     unit_norm=not self.code_exact_banks)
    state = common.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                              opt_state=opt_state, banks=banks, rng=run_key)
    return self._init_extra(state, extra_key, variables, sample_views)

  def _init_extra(self, state, key, variables, sample_views):
    return state

  # ---- evaluation ----------------------------------------------------------------------------
  def features(self, state_params: dict, state_stats: dict, views) -> dict:
    """Frozen-encoder features for the linear probe: conv and fc levels, views concatenated."""
    outs = self.encoder.apply({"params": state_params["encoder"],
                               "batch_stats": state_stats["encoder"]}, tuple(views), train=False)
    return {"conv": jnp.concatenate([o["conv"] for o in outs], axis=-1),
            "fc": jnp.concatenate([o["fc"] for o in outs], axis=-1),
            "embedding": jnp.concatenate([o["embedding"] for o in outs], axis=-1)}

  # ---- training ------------------------------------------------------------------------------
  def train_step(self, state: common.TrainState, batch: dict):
    raise NotImplementedError

  def _encoder_step(self, state, loss_fn):
    """One SGD step of the encoder on `loss_fn(encoder params) -> (loss, (batch_stats, aux))`:
    the gradient is pmean'd over devices after grad. Returns (state after the step with only
    the encoder's params / batch_stats / opt_state, loss, aux, metrics of the update)."""
    (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["encoder"])
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads)
    new_state = state.replace(step=state.step + 1, params={"encoder": params},
                              batch_stats={"encoder": stats}, opt_state={"encoder": opt})
    return new_state, loss, aux, {"loss": loss, "grad_norm": common.global_norm(grads),
                                  "update_norm": update_norm}

  def _apply_encoder_update(self, state, grads):
    updates, opt = self.encoder_tx.update(grads, state.opt_state["encoder"],
                                          state.params["encoder"])
    params = optax.apply_updates(state.params["encoder"], updates)
    return params, opt, common.global_norm(updates)
