"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of the two views'
projections, standardised over the global batch, pushed towards the identity.

Loss: sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 (Eq. 1) with lambda = 0.0051, times
`barlow_twins.scale_loss` (0.024, the authors' first released code; it keeps SGD steps at the
size the other methods take); the
standardisation is the paper's final BatchNorm without affine parameters, computed over every
device's examples (synchronised), and C sums over the global batch. Our encoders' fc head is
the projector; the paper's is three 8192-wide layers (`model.embedding_dim` sets ours).
"""

import ml_collections

from metaug_jax import feature_aug, parallel
from metaug_jax.losses import adapters
from metaug_jax.config_check import Range
from metaug_jax.methods import common, registry, siamese
from metaug_jax.methods.registry import PaperRow, table1


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lambda_offdiag = 0.0051  # lambda of Eq. 1
  # A constant factor on the loss, the released code's first version's --scale-loss (0.024):
  # the summed loss is O(embedding_dim), and without it our SGD steps are ~40x larger.
  c.scale_loss = 0.024
  return c


@registry.register(
    "barlow_twins", summary="Barlow Twins: cross-correlation of the views' projections "
    "towards the identity", section="barlow_twins", defaults=defaults,
    ranges={"lambda_offdiag": Range(0), "scale_loss": Range(0, lo_open=True)},
    variant=siamese.two_view_variant, check=siamese.two_view_check("barlow_twins"),
    paper_rows=(PaperRow("Barlow Twins", {}, table1(39.81, 40.34, 80.97, 81.43, 76.63, 78.49,
                                                     52.80, 52.95)),))
class BarlowTwins(siamese.TwoViewMethod):
  """Barlow Twins with a shared two-view encoder."""

  def train_step(self, state, batch):
    views = self.views(state, batch)

    def loss_fn(params):
      outs, stats = common.apply_encoder(self.encoder, params, state.batch_stats["encoder"],
                                         views)
      bc = self.config.barlow_twins
      pair = feature_aug.ContrastBatch(outs[0]["projection"], outs[1]["projection"][:, None])
      loss = bc.scale_loss * adapters.barlow_twins(pair, bc.lambda_offdiag,
                                                   axis_name=parallel.AXIS)
      return loss, (stats, None)

    new_state, _, _, metrics = self._encoder_step(state, loss_fn)
    return new_state, parallel.pmean(metrics)
