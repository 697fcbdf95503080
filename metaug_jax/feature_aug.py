"""The feature-augmentation interface: what a contrastive loss sees, and the pure functions that
rewrite it (docs/feature_augmentation.md).

A method's step encodes its views, builds one `ContrastBatch` per contrast direction (anchor
view x against positive view y), passes it through its `FeatureAugmenter`, and hands the result
to a loss adapter (`metaug_jax.losses.adapters`). The augmenter is where the family's methods
differ: Feature Transformation mixes positives and negatives, MetAug's generators add augmented
anchors, the configurable feature-augmentation module perturbs what it is told to.

Invariants, enforced here and tested:
  * `to_enqueue` holds the original targets; an augmenter never changes it, and only it reaches
    a queue or a memory bank (`check_enqueue_untouched`).
  * diagnostics (score statistics) are computed on the batch the loss sees, after augmentation.
  * a learned augmenter brings its own optimiser and outer objective (`LearnedAugmenter`).
"""

from typing import Any, Optional, Protocol

import chex
import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class ContrastBatch:
  """What an instance-discrimination loss sees for one contrast direction.

  Fields (B anchors on this device, D the embedding width):
    anchor: (B, D) online embeddings; they carry the encoder's gradient.
    positive: (B, P, D) each anchor's positives (P = 1 for a key or the other view).
    negatives: (K, D) shared by every anchor (a queue, the gathered batch) or (B, K, D) per
      anchor (memory-bank rows sampled per anchor); None for losses without negatives.
    extra_positive: optional (B, P', D) positives added by an augmenter.
    extra_negative: optional (B or 1, M, D) negatives added by an augmenter.
    extra_anchor: optional (B, D) augmented anchors, e.g. MetAug's generated queries (its
      generators set them on each view's anchor-only batch, and its bank calls use them as the
      queries of the augmented calls, against those calls' own negatives).
    to_enqueue: (B, D) the original targets a queue or bank receives; never augmented.
    unit_norm: whether anchor/positive/negatives are still unit-norm (static; FT without
      re-normalisation breaks it, and losses that rescale cos to [0, 1] need it).
  """
  anchor: jax.Array
  positive: jax.Array
  negatives: Optional[jax.Array] = None
  extra_positive: Optional[jax.Array] = None
  extra_negative: Optional[jax.Array] = None
  extra_anchor: Optional[jax.Array] = None
  to_enqueue: Optional[jax.Array] = None
  unit_norm: bool = flax.struct.field(pytree_node=False, default=True)



def checked(batch: ContrastBatch) -> ContrastBatch:
  """`batch` after asserting its documented shapes (call at the boundaries of an augmenter)."""
  chex.assert_rank(batch.anchor, 2)
  chex.assert_rank(batch.positive, 3)
  b, d = batch.anchor.shape
  chex.assert_shape(batch.positive, (b, None, d))
  if batch.negatives is not None:
    if batch.negatives.ndim == 2:
      chex.assert_shape(batch.negatives, (None, d))
    else:
      chex.assert_shape(batch.negatives, (b, None, d))
  if batch.extra_positive is not None:
    chex.assert_shape(batch.extra_positive, (b, None, d))
  if batch.extra_negative is not None:
    chex.assert_rank(batch.extra_negative, 3)
    chex.assert_axis_dimension(batch.extra_negative, 2, d)
  if batch.extra_anchor is not None:
    chex.assert_shape(batch.extra_anchor, (b, d))
  if batch.to_enqueue is not None:
    chex.assert_axis_dimension(batch.to_enqueue, 1, d)
  return batch


def check_enqueue_untouched(before: ContrastBatch, after: ContrastBatch) -> None:
  """Raise if an augmenter replaced `to_enqueue` (checked at trace time: the same array object
  must come back, so an augmented feature can never reach a queue or bank)."""
  if after.to_enqueue is not before.to_enqueue:
    raise ValueError("a feature augmenter changed ContrastBatch.to_enqueue; queues and memory "
                     "banks only ever receive the original targets")


class FeatureAugmenter(Protocol):
  """A pure rewrite of a ContrastBatch, with its own parameters, state and RNG.

  `init` returns (params, state) (either may be an empty dict); `apply` returns
  (augmented batch, new state, metrics). Parameter-free augmenters (Feature Transformation,
  noise, mixing) ignore `params`; their randomness comes only from `key`.
  """

  def init(self, key: jax.Array, sample: ContrastBatch) -> tuple[Any, Any]:
    ...

  def apply(self, params: Any, state: Any, key: jax.Array, batch: ContrastBatch,
            step: jax.Array) -> tuple[ContrastBatch, Any, dict]:
    ...


class LearnedAugmenter(FeatureAugmenter, Protocol):
  """An augmenter whose parameters are trained by their own optimiser on their own objective
  (MetAug's generators: a meta-gradient through a virtual encoder step)."""

  def optimizer(self) -> optax.GradientTransformation:
    ...


class Identity:
  """The augmenter of the plain methods: returns the batch unchanged."""

  def init(self, key, sample):
    return {}, {}

  def apply(self, params, state, key, batch, step):
    return batch, state, {}


def apply_augmenter(augmenter: FeatureAugmenter, params, state, key, batch: ContrastBatch,
                    step) -> tuple[ContrastBatch, Any, dict]:
  """`augmenter.apply` with the interface's invariants checked around it."""
  out, new_state, metrics = augmenter.apply(params, state, key, checked(batch), step)
  check_enqueue_untouched(batch, out)
  return checked(out), new_state, metrics


def positive_scores(batch: ContrastBatch) -> jax.Array:
  """(B, P [+ P']) anchor . positive dot products, extra positives appended."""
  pos = jnp.einsum("bd,bpd->bp", batch.anchor, batch.positive)
  if batch.extra_positive is not None:
    pos = jnp.concatenate([pos, jnp.einsum("bd,bpd->bp", batch.anchor, batch.extra_positive)],
                          axis=1)
  return pos


def negative_scores(batch: ContrastBatch) -> Optional[jax.Array]:
  """(B, K [+ M]) anchor . negative dot products (shared or per-anchor negatives), extra
  negatives appended; None when the batch has no negatives."""
  parts = []
  if batch.negatives is not None:
    if batch.negatives.ndim == 2:
      parts.append(jnp.einsum("bd,kd->bk", batch.anchor, batch.negatives))
    else:
      parts.append(jnp.einsum("bd,bkd->bk", batch.anchor, batch.negatives))
  if batch.extra_negative is not None:
    extra = jnp.broadcast_to(batch.extra_negative,
                             (batch.anchor.shape[0],) + batch.extra_negative.shape[1:])
    parts.append(jnp.einsum("bd,bmd->bm", batch.anchor, extra))
  if not parts:
    return None
  return jnp.concatenate(parts, axis=1)
