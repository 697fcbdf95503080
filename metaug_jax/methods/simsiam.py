"""SimSiam (Chen & He, CVPR 2021): a predictor and a stop-gradient, nothing else.

Loss: D(p_1, sg(z_2)) / 2 + D(p_2, sg(z_1)) / 2 with D the negative cosine (Eqs. 1-2), z the
projection (our encoders' fc head; the paper ends its projector with a BatchNorm) and p the
bottleneck predictor (Sec. 3: 512 hidden for a 2048-wide projection; here a quarter of
`model.embedding_dim` by default). The base method of hierarchical augmentation invariance.
"""

import jax.numpy as jnp
import ml_collections

from metaug_jax import feature_aug, parallel
from metaug_jax.losses import adapters
from metaug_jax.config_check import Range
from metaug_jax.methods import common, registry, siamese


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.predictor_hidden = 0     # 0: model.embedding_dim // 4 (the paper's 512 for 2048)
  return c


@registry.register(
    "simsiam", summary="SimSiam: predictor + stop-gradient, negative cosine, no negatives",
    section="simsiam", defaults=defaults, ranges={"predictor_hidden": Range(0, integer=True)},
    variant=siamese.two_view_variant, check=siamese.two_view_check("simsiam"))
class SimSiam(siamese.TwoViewMethod):
  """SimSiam with a shared two-view encoder and its bottleneck predictor."""

  def predictor_width(self):
    hidden = int(self.config.simsiam.predictor_hidden)
    return hidden or max(1, int(self.config.model.embedding_dim) // 4)

  def _init_extra(self, state, key, variables, sample_views):
    return self._init_predictor(state, key)

  def train_step(self, state, batch):
    views = self.views(state, batch)

    def loss_fn(online):
      outs, enc_stats = common.apply_encoder(self.encoder, online["encoder"],
                                             state.batch_stats["encoder"], views)
      z1, z2 = (o["projection"] for o in outs)
      p, pred_stats = self.predict(online["predictor"], state.batch_stats["predictor"],
                                   jnp.concatenate([z1, z2], axis=0))
      p1, p2 = jnp.split(p, 2, axis=0)
      loss = 0.5 * (adapters.negative_cosine(feature_aug.ContrastBatch(p1, z2[:, None])) +
                    adapters.negative_cosine(feature_aug.ContrastBatch(p2, z1[:, None])))
      return loss, (enc_stats, pred_stats, z1)

    (params, stats, opt), loss, z1, metrics = self._online_step(state, loss_fn)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt)
    # The collapse monitor of the paper (Fig. 2): std of the l2-normalised projection.
    z_std = jnp.mean(jnp.std(z1 / jnp.linalg.norm(z1, axis=-1, keepdims=True), axis=0))
    metrics["projection_std_per_dim"] = z_std
    return new_state, parallel.pmean(metrics)
