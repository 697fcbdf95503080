"""MetAug's meta feature augmentation generators (MAGs) as a learned feature augmenter
(Li et al., ICML 2022; docs/metaug.md §3.2 and §4.4).

One MAG per view maps the view's unit-norm embedding z_v to a generated query a_v. The
generators extend each view's anchor-only ContrastBatch with `extra_anchor = a_v`; MetAug's
bank calls then use a_v as the query of the augmented calls (S_v, S_all), each against its own
negatives, while `to_enqueue` stays z_v. The generators bring what a `LearnedAugmenter` must:
their own optimiser (`optimizer`) and their own outer objective (`outer_gradient`: the
meta-objective through a virtual encoder step, differentiated by the configured strategy of
`metaug_jax.meta_gradient`).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metaug_jax import feature_aug, meta_gradient
from metaug_jax.models import mag as mag_lib


def view_batches(embeddings: Sequence[jax.Array]) -> tuple:
  """Each view's anchor-only ContrastBatch: anchor = to_enqueue = z_v, no positives (width 0)
  or negatives, which every bank call draws for itself."""
  out = []
  for z in embeddings:
    empty = jnp.zeros((z.shape[0], 0, z.shape[1]), z.dtype)
    out.append(feature_aug.checked(
        feature_aug.ContrastBatch(anchor=z, positive=empty, to_enqueue=z)))
  return tuple(out)


class MetaFeatureGenerators:
  """The V MAGs of MetAug as a `feature_aug.LearnedAugmenter` over the views' batches.

  Its `batch` is the sequence of the V views' ContrastBatches (`view_batches`), since each MAG
  acts on its own view; params and state are the MAGs' parameter tree and BatchNorm
  statistics (submodules view_0, view_1, ...).

  Args:
    config: the experiment config (reads `model` and `metaug`).
    num_views: V.
  """

  def __init__(self, config: ml_collections.ConfigDict, num_views: int):
    self.config = config.metaug
    self.num_views = num_views
    self.module = mag_lib.build_multiview_mag(config.model, num_views, axis_name="batch")
    self.strategy = meta_gradient.strategy_name(config.metaug)

  def init(self, key: jax.Array, sample: Sequence[feature_aug.ContrastBatch]):
    """(params, BatchNorm statistics) of the V MAGs; `sample` fixes the shapes."""
    variables = self.module.init(key, tuple(b.anchor for b in sample), train=False)
    return variables["params"], variables.get("batch_stats", {})

  def apply(self, params, state, key, batch: Sequence[feature_aug.ContrastBatch], step):
    """(the views' batches with extra_anchor = a_v, new BatchNorm statistics, metrics).

    Train-mode BatchNorm on the batch's statistics; a virtual forward (docs/metaug.md,
    decision A10) simply drops the returned statistics. `key` and `step` are unused: the
    MAGs are deterministic.
    """
    del key, step
    for b in batch:
      feature_aug.checked(b)
    outs, mutated = self.module.apply({"params": params, "batch_stats": state},
                                      tuple(b.anchor for b in batch), train=True,
                                      mutable=["batch_stats"])
    out = tuple(b.replace(extra_anchor=o["embedding"]) for b, o in zip(batch, outs))
    for before, after in zip(batch, out):
      feature_aug.check_enqueue_untouched(before, after)
    return tuple(feature_aug.checked(b) for b in out), mutated["batch_stats"], {}

  def optimizer(self) -> optax.GradientTransformation:
    """The MAGs' SGD (docs/metaug.md §5.4): constant lr, momentum, L2 added to the gradient
    on every parameter (PyTorch semantics, as the encoders', decision A12)."""
    mc = self.config
    return optax.chain(optax.add_decayed_weights(mc.mag_weight_decay),
                       optax.sgd(mc.mag_lr, momentum=mc.mag_momentum or None))

  def outer_gradient(self, objective: meta_gradient.Objective, theta_before, theta_after,
                     omega, banks, phase_a=None) -> meta_gradient.MetaGradient:
    """The generators' own objective: the direct and second-order parts of the gradient of
    F(omega) = L_total(theta'(omega), omega), theta' = theta - alpha grad_theta
    L_total(theta, omega), by `metaug.*`'s strategy (docs/metaug.md §6); the legacy step's
    look-ahead of the MAGs' own parameters instead. `meta_gradient.combine` sums the parts.

    Args:
      objective: the step's L_total.
      theta_before, theta_after: the encoders before and after Phase A's update.
      omega: the MAGs' parameters.
      banks: the banks after Phase A.
      phase_a: Phase A's `meta_gradient.PhaseA`; the strategies that take the virtual step
        from theta_before reuse its gradient (and linearisation). The fused reverse strategy
        computes Phase A itself (`meta_gradient.fused_reverse`) and is not dispatched here.
    """
    mc = self.config
    alpha = mc.inner_lr
    if self.strategy == "legacy":
      return meta_gradient.legacy_generators(objective, theta_after, omega, banks, alpha,
                                             mc.first_order)
    if self.strategy == "fused_forward_over_reverse":
      return meta_gradient.forward_over_reverse(objective, phase_a.linearization,
                                                theta_before, omega, alpha)
    if self.strategy == "first_order" and mc.virtual_step_from == "current":
      return meta_gradient.first_order(objective, theta_before, phase_a.grad, omega, banks,
                                       alpha)
    if self.strategy in ("first_order", "forward_over_reverse"):
      inner = meta_gradient.linearize(objective, theta_after, omega, banks, "inner",
                                      update_stats=False)
      if self.strategy == "first_order":
        return meta_gradient.first_order(objective, theta_after, inner.grad, omega,
                                         inner.banks, alpha)
      return meta_gradient.forward_over_reverse(objective, inner, theta_after, omega, alpha)
    if self.strategy == "reverse":
      return meta_gradient.reverse(objective, theta_after, omega, banks, alpha)
    raise ValueError(f"no generator gradient for strategy {self.strategy!r} here")

  def hidden_features(self, params, state, embeddings: Sequence[jax.Array]) -> jax.Array:
    """The MAGs' fc2 activations on the views' embeddings, eval-mode BatchNorm, views
    concatenated: the probe's `mag_hidden` level (docs/metaug.md, decision A9 (b))."""
    outs = self.module.apply({"params": params, "batch_stats": state}, tuple(embeddings),
                             train=False)
    return jnp.concatenate([o["hidden"] for o in outs], axis=-1)
