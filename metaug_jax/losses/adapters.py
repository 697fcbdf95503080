"""Loss adapters: the library's contrastive losses as functions of `feature_aug.ContrastBatch`
(docs/feature_augmentation.md).

A method builds ContrastBatches, passes them through its feature augmenter, and hands what
comes out to one of these; so whatever an augmenter rewrote or added is what the loss sees,
and the scores an adapter returns (for diagnostics) are the ones it used.

  infonce          MoCo's queue and CMC's bank rows (Oord et al. 2018, Eq. 4; the debiased and
                   hard-negative estimators of losses/negatives.py)
  nt_xent          SimCLR's in-batch loss (Chen et al. 2020, Eq. 1)
  oucl             MetAug's unified loss over the directions of one bank call, on d = (s + 1)/2
                   (docs/metaug.md §4.1)
  negative_cosine  SimSiam's D(p, sg(z)) (Chen & He 2021, Eq. 1) and BYOL's 2 - 2 cos (Grill
                   et al. 2020, Eq. 2)
  barlow_twins     Barlow Twins' cross-correlation loss (Zbontar et al. 2021, Eq. 1)

An adapter refuses a field it has no use for (an extra anchor given to InfoNCE, negatives given
to a loss without negatives) instead of dropping it silently.
"""

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from metaug_jax import feature_aug
from metaug_jax.memory_bank import split_scores
from metaug_jax.losses import negatives as negatives_lib
from metaug_jax.losses.oucl import oucl as oucl_loss
from metaug_jax.losses import similarity
from metaug_jax.losses.contrastive import nt_xent as nt_xent_loss
from metaug_jax.losses.contrastive import score_from_cosine

ContrastBatch = feature_aug.ContrastBatch
# (batch) -> (B, P + K) dot products of each anchor with its positives, then its negatives.
Scorer = Callable[[ContrastBatch], jax.Array]
SCORE_RANGES = ("keep", "clip")     # oucl: what happens to d outside [0, 1]


def _refuse(batch: ContrastBatch, loss: str, *fields: str) -> None:
  """ValueError naming the first of `fields` that the batch sets."""
  for field in fields:
    if getattr(batch, field) is not None:
      raise ValueError(f"the {loss} loss adapter takes no ContrastBatch.{field}; this batch "
                       f"has one (an augmenter added it)")


def _single_positive(batch: ContrastBatch, loss: str) -> jax.Array:
  """(B, D) the one positive per anchor of a loss with one target per anchor."""
  _refuse(batch, loss, "extra_positive")
  if batch.positive.shape[1] != 1:
    raise ValueError(f"the {loss} loss adapter takes one positive per anchor, got "
                     f"{batch.positive.shape[1]}")
  return batch.positive[:, 0]


def dot_scores(batch: ContrastBatch) -> jax.Array:
  """(B, P + K) the batch's anchor . positive, then anchor . negative dot products."""
  neg = feature_aug.negative_scores(batch)
  pos = feature_aug.positive_scores(batch)
  return pos if neg is None else jnp.concatenate([pos, neg], axis=1)


def infonce(batch: ContrastBatch, temperature: float, *, negatives: str = "plain",
            tau_plus: float = 0.1, beta: float = 1.0):
  """Per-anchor InfoNCE of one direction: its one positive against its negatives (a queue, or
  per-anchor bank rows), extra negatives included; `negatives` picks the plain, debiased or
  hard-negative estimator (losses/negatives.py).

  Returns:
    ((B,) losses, (pos (B,), neg (B, K)) the dot products the loss saw).
  """
  _refuse(batch, "infonce", "extra_anchor")
  _single_positive(batch, "infonce")
  pos = feature_aug.positive_scores(batch)[:, 0]
  neg = feature_aug.negative_scores(batch)
  if neg is None:
    raise ValueError("the infonce loss adapter needs negatives (a queue or bank rows)")
  loss = negatives_lib.infonce_from_scores(pos, neg, temperature, negatives=negatives,
                                           tau_plus=tau_plus, beta=beta)
  return loss, (pos, neg)


def nt_xent(batch: ContrastBatch, temperature: float, *, axis_name: Optional[str],
            negatives: str = "plain", tau_plus: float = 0.1, beta: float = 1.0) -> jax.Array:
  """SimCLR's NT-Xent of one view pair, mean over anchors: anchor = view 1, positive = view 2;
  the negatives are the rest of the global batch (both views, gathered over `axis_name`), so
  the batch carries none."""
  _refuse(batch, "nt_xent", "negatives", "extra_negative", "extra_anchor")
  z2 = _single_positive(batch, "nt_xent")
  if negatives == "plain":
    return nt_xent_loss(batch.anchor, z2, temperature, axis_name=axis_name)
  pos, neg, valid = negatives_lib.nt_xent_scores(batch.anchor, z2, axis_name=axis_name)
  return jnp.mean(negatives_lib.infonce_from_scores(pos, neg, temperature, valid=valid,
                                                    negatives=negatives, tau_plus=tau_plus,
                                                    beta=beta))


class OuclResult(NamedTuple):
  """`oucl`'s per-anchor losses, the d scores they saw, and the share of d outside [0, 1]."""
  loss: jax.Array            # (B,)
  scores: jax.Array          # (B, P, 1 + K), column 0 the positive
  out_of_range: jax.Array    # scalar: share of the raw d outside [0, 1] (before any clip)


# d of unit vectors leaves [0, 1] by float rounding alone (|cos| up to 1 + ~1e-7).
_RANGE_SLACK = 1e-6


def oucl(batches: Sequence[ContrastBatch], *, scorer: Scorer = dot_scores,
         score_range: str = "keep", **options) -> OuclResult:
  """Per-anchor OUCL over the directions of one bank call (docs/metaug.md §4.1).

  Each batch is one direction (query view x against bank y): one positive (the anchor's own
  row) and K negatives. Scores are d = (s + 1) / 2; an anchor's P positives and P K negatives
  over all P directions enter one `losses.oucl`. `scorer` computes a batch's dot products
  (`memory_bank.BankCall.scorer` scores rows no augmenter touched against the whole bank;
  same values). d leaves [0, 1] when an augmenter broke unit norm (FT without
  re-normalisation): score_range="keep" leaves it, "clip" clips it to [0, 1].

  Args:
    batches: the call's directions, each with positive (B, 1, D) and negatives (B, K, D).
    scorer: (batch) -> (B, 1 + K) dot products.
    score_range: "keep" or "clip".
    **options: `losses.oucl`'s form, beta, gamma_pos, gamma_neg, margin, adaptive, scale.
  """
  if score_range not in SCORE_RANGES:
    raise ValueError(f"score_range must be one of {SCORE_RANGES}, got {score_range!r}")
  raw = []
  for batch in batches:
    _refuse(batch, "oucl", "extra_anchor", "extra_positive", "extra_negative")
    if batch.positive.shape[1] != 1:
      raise ValueError(f"the oucl loss adapter takes one positive per direction, got "
                       f"{batch.positive.shape[1]}")
    raw.append(score_from_cosine(scorer(batch)))
  raw = jnp.stack(raw, axis=1)
  outside = (raw < -_RANGE_SLACK) | (raw > 1.0 + _RANGE_SLACK)
  scores = jnp.clip(raw, 0.0, 1.0) if score_range == "clip" else raw
  pos, neg = split_scores(scores)
  return OuclResult(oucl_loss(pos, neg, **options), scores,
                    jnp.mean(outside.astype(jnp.float32)))


def negative_cosine(batch: ContrastBatch, *, form: str = "simsiam") -> jax.Array:
  """Mean over anchors of SimSiam's D(p, sg(z)) = -cos (form="simsiam") or BYOL's
  2 - 2 cos(p, sg(z)) (form="byol"): anchor = the prediction p, positive = the target z (no
  gradient reaches it)."""
  _refuse(batch, "negative_cosine", "negatives", "extra_negative", "extra_anchor")
  target = _single_positive(batch, "negative_cosine")
  if form == "simsiam":
    return similarity.negative_cosine(batch.anchor, target)
  if form == "byol":
    return similarity.byol_loss(batch.anchor, target)
  raise ValueError(f"form must be 'simsiam' or 'byol', got {form!r}")


def barlow_twins(batch: ContrastBatch, lambda_offdiag: float,
                 axis_name: Optional[str]) -> jax.Array:
  """Barlow Twins' loss of the cross-correlation of anchor (view 1) and positive (view 2),
  standardised over the global batch (`losses.barlow_twins`)."""
  _refuse(batch, "barlow_twins", "negatives", "extra_negative", "extra_anchor")
  z2 = _single_positive(batch, "barlow_twins")
  return similarity.barlow_twins(batch.anchor, z2, lambda_offdiag, axis_name=axis_name)
