"""BYOL (Grill et al., NeurIPS 2020): an online network with a predictor regresses the
projections of a target network, the exponential moving average of the online one.

Loss: 2 - 2 cos(q(y_1), sg(y'_2)) + the same with the views swapped (Eq. 2 symmetrised);
target decay tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 from tau_base to 1 over the run
(Sec. 3.2). The target is a copy of the encoder with its projector (our encoders' fc head)
whose parameters follow the online ones by that average, while its BatchNorm running
statistics come from its own forward passes; the predictor is online only. Our SGD replaces the paper's LARS so that
every method of a comparison shares one optimiser.
"""

import jax
import jax.numpy as jnp
import ml_collections

from metaug_jax import ema, feature_aug, parallel
from metaug_jax.losses import adapters
from metaug_jax.config_check import Range
from metaug_jax.methods import common, registry, siamese
from metaug_jax.methods.registry import PaperRow, table1
from metaug_jax.models.layers import l2_normalize


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base_decay = 0.996       # tau_base (ImageNet; many CIFAR runs use 0.99)
  c.predictor_hidden = 4096  # q's hidden width
  return c


@registry.register(
    "byol", summary="BYOL: predictor + EMA target network, no negatives",
    section="byol", defaults=defaults,
    ranges={"base_decay": Range(0, 1), "predictor_hidden": Range(1, integer=True)},
    variant=siamese.two_view_variant, check=siamese.two_view_check("byol"),
    paper_rows=(PaperRow("BYOL", {}, table1(41.59, 41.90, 81.73, 81.57, 77.18, 80.01,
                                             53.64, 53.78)),))
class BYOL(siamese.TwoViewMethod):
  """BYOL with a shared two-view online encoder, its predictor and the EMA target."""

  def __init__(self, config, facts):
    super().__init__(config, facts)
    self.total_steps = int(config.num_train_steps or config.num_epochs * facts.steps_per_epoch)

  def predictor_width(self):
    return int(self.config.byol.predictor_hidden)

  def _init_extra(self, state, key, variables, sample_views):
    return self.copy_of_encoder(self._init_predictor(state, key), "target")

  def advance(self, state, params, stats, opt, target_stats):
    """(the state after the online update `params`/`stats`/`opt`, with the target network
    moved towards the new online encoder by the cosine-scheduled EMA; that decay)."""
    decay = ema.byol_decay(state.step, self.total_steps, self.config.byol.base_decay)
    new_state = state.replace(
        step=state.step + 1,
        params={**params, "target": ema.ema_update(state.params["target"], params["encoder"],
                                                   decay)},
        batch_stats={**stats, "target": target_stats}, opt_state=opt)
    return new_state, decay

  def train_step(self, state, batch):
    views = self.views(state, batch)
    target_outs, target_stats = common.apply_encoder(self.encoder, state.params["target"],
                                                     state.batch_stats["target"], views)
    targets = [jax.lax.stop_gradient(o["projection"]) for o in target_outs]

    def loss_fn(online):
      outs, enc_stats = common.apply_encoder(self.encoder, online["encoder"],
                                             state.batch_stats["encoder"], views)
      # Both views through the predictor as one batch (one set of BN statistics).
      both = jnp.concatenate([o["projection"] for o in outs], axis=0)
      p, pred_stats = self.predict(online["predictor"], state.batch_stats["predictor"], both)
      p1, p2 = jnp.split(p, 2, axis=0)
      loss = (adapters.negative_cosine(feature_aug.ContrastBatch(p1, targets[1][:, None]),
                                       form="byol") +
              adapters.negative_cosine(feature_aug.ContrastBatch(p2, targets[0][:, None]),
                                       form="byol"))
      return loss, (enc_stats, pred_stats, p1)

    (params, stats, opt), loss, p1, metrics = self._online_step(state, loss_fn)
    new_state, decay = self.advance(state, params, stats, opt, target_stats)
    cos = jnp.sum(l2_normalize(p1) * l2_normalize(targets[1]), axis=-1)
    metrics.update(target_decay=decay, pos_mean=jnp.mean(cos), pos_std=jnp.std(cos))
    return new_state, parallel.pmean(metrics)
