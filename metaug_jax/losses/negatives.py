"""The InfoNCE family from scores: plain, debiased and hard-negative estimators of the negatives.

One loss serves every negative source: SimCLR's in-batch negatives (`nt_xent_scores`, with a
mask that drops each anchor itself and its positive), CMC's memory-bank rows (bank scores
column 0 as `pos`, the rest as `neg`) and MoCo's queue (`queue.scores`, all valid). Only the
estimate Ng of the negatives' term in the denominator changes between the modes:

  loss = -log( e^{s+/t} / (e^{s+/t} + Ng) )

  "plain":    Ng = sum_k e^{s_k/t}                               (Oord et al. 2018, Eq. 4)
  "debiased": Ng = max( (sum_k e^{s_k/t} - N tau+ e^{s+/t}) / (1 - tau+), N e^{-1/t} )
                                                                 (Chuang et al. 2020, Eq. 10)
  "hard":     as "debiased" with sum_k e^{s_k/t} replaced by sum_k w_k e^{s_k/t},
              w_k = e^{beta s_k/t} / mean_j e^{beta s_j/t}       (Robinson et al. 2021, Eq. 3-4)

with N the number of valid negatives of the anchor. Every sum is taken in units of e^{m},
m a per-row maximum of the logits, so nothing overflows at small temperatures.
"""

from typing import Optional, Union

import chex
import jax
import jax.numpy as jnp

from metaug_jax.losses.contrastive import _float, in_batch_pairs

NEGATIVE_MODES = ("plain", "debiased", "hard")

Scalar = Union[float, jax.Array]


def _masked_max(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Row maxima of x over the valid entries; -inf for a row without any."""
  return jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1)


def _masked_exp(x: jax.Array, shift: jax.Array, valid: jax.Array) -> jax.Array:
  """e^{x - shift} at valid entries and 0 elsewhere, with zero (not NaN) gradient at the rest.

  The inner `where` keeps exp() of a masked entry at e^0, so its derivative is never inf * 0.
  """
  x = jnp.where(valid, x, shift[:, None])
  return jnp.where(valid, jnp.exp(x - shift[:, None]), 0.0)


def _importance_weights(logits: jax.Array, valid: jax.Array, beta: Scalar,
                        count: jax.Array) -> jax.Array:
  """Robinson et al. (2021, Eq. 4)'s w_k = e^{beta u_k} / mean_valid e^{beta u_j}; 0 if masked.

  Computed as count * softmax_valid(beta u), which is the same and stable for any beta.
  """
  a = beta * logits
  a_max = jax.lax.stop_gradient(_masked_max(a, valid))
  a_max = jnp.where(jnp.isfinite(a_max), a_max, 0.0)  # a row with no valid negative
  e = _masked_exp(a, a_max, valid)
  total = jnp.sum(e, axis=-1, keepdims=True)
  return count[:, None] * e / jnp.where(total > 0, total, 1.0)


def _check_options(negatives: str, tau_plus: Scalar) -> None:
  if negatives not in NEGATIVE_MODES:
    raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
  if negatives != "plain" and isinstance(tau_plus, (int, float)) and not 0.0 <= tau_plus < 1.0:
    raise ValueError(f"tau_plus (the positive-class prior) must be in [0, 1), got {tau_plus}")


def infonce_from_scores(pos: jax.Array, neg: jax.Array, temperature: Scalar, *,
                        valid: Optional[jax.Array] = None, negatives: str = "plain",
                        tau_plus: Scalar = 0.1, beta: Scalar = 1.0) -> jax.Array:
  """Per-anchor InfoNCE with the negatives' term estimated as `negatives` says (module doc).

  "debiased" corrects for negatives that share the anchor's latent class, with prior tau_plus
  (Chuang et al., NeurIPS 2020, Eq. 10, with their code's clamp at the theoretical minimum
  N e^{-1/t}); at tau_plus = 0 it equals "plain" for cosines in [-1, 1]. "hard" also reweights
  the negatives by w_k (Robinson et al., ICLR 2021, Eq. 3-4 as in their code); beta = 0 gives
  "debiased", tau_plus = 0 pure hard-negative reweighting.

  Args:
    pos: (B,) cosine of each anchor with its positive.
    neg: (B, K) cosines of each anchor with K candidate negatives.
    temperature: the softmax temperature t.
    valid: optional (B, K) bool, False where neg is not a negative of that anchor (e.g. the
      anchor itself and its positive among in-batch scores); None means all are.
    negatives: "plain", "debiased" or "hard".
    tau_plus: the class prior tau+ ("debiased", "hard").
    beta: the concentration beta of the hard-negative weights ("hard").
  Returns:
    (B,) per-anchor losses (at least float32).
  """
  _check_options(negatives, tau_plus)
  chex.assert_rank([pos, neg], [1, 2])
  chex.assert_equal(pos.shape[0], neg.shape[0])
  if valid is None:
    valid = jnp.ones(neg.shape, bool)
  chex.assert_shape(valid, neg.shape)
  chex.assert_type(valid, bool)
  pos_logit = _float(pos) / temperature  # u+ = s+ / t
  logits = _float(neg) / temperature  # u_k = s_k / t
  floor = -1.0 / temperature * jnp.ones_like(pos_logit)  # log of e^{-1/t}, the clamp's unit
  # The shift m cancels in the loss; as a constant it leaves the gradient exact.
  shift = jax.lax.stop_gradient(
      jnp.maximum(jnp.maximum(pos_logit, floor), _masked_max(logits, valid)))
  exp_neg = _masked_exp(logits, shift, valid)  # e^{u_k - m}
  count = jnp.sum(valid, axis=-1).astype(pos_logit.dtype)  # N
  if negatives == "plain":
    ng = jnp.sum(exp_neg, axis=-1)
  else:
    if negatives == "hard":
      exp_neg = _importance_weights(logits, valid, beta, count) * exp_neg
    total = jnp.sum(exp_neg, axis=-1)
    exp_pos = jnp.exp(pos_logit - shift)  # e^{u+ - m}
    ng = jnp.maximum((total - count * tau_plus * exp_pos) / (1.0 - tau_plus),
                     count * jnp.exp(floor - shift))
  # -log(e^{u+} / (e^{u+} + Ng)) = log(1 + Ng e^{-u+}) = softplus(log(Ng e^{-m}) - (u+ - m)):
  # accurate when Ng << e^{u+}, where log(e^{u+ - m} + Ng e^{-m}) would round to 0.
  has_neg = ng > 0  # False only without valid negatives (or an estimate below float range)
  log_ng = jnp.log(jnp.where(has_neg, ng, 1.0))
  return jnp.where(has_neg, jax.nn.softplus(log_ng - (pos_logit - shift)), 0.0)


def nt_xent_scores(z1: jax.Array, z2: jax.Array,
                   axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SimCLR's in-batch scores (Chen et al. 2020, Eq. 1) for `infonce_from_scores`.

  The 2B local anchors [z1; z2] are scored against the 2N embeddings of the global batch
  [all z1; all z2] (gathered over `axis_name` when given, device order). Anchor i's positive
  is its other view; every column but itself and its positive is a valid negative (2N - 2).
  With `pos, neg, valid = nt_xent_scores(z1, z2, ax)`,
  `infonce_from_scores(pos, neg, t, valid=valid).mean()` equals `nt_xent(z1, z2, t, ax)`.

  Args:
    z1: (B, D) local L2-normalised embeddings of view 1.
    z2: (B, D) local embeddings of view 2, row i the positive of z1 row i.
    axis_name: pmap / shard_map axis to gather negatives over, or None.
  Returns:
    pos (2B,), neg (2B, 2N) cosines and valid (2B, 2N) bool.
  """
  anchors, keys, self_idx, pos_idx = in_batch_pairs(z1, z2, axis_name)
  cos = anchors @ keys.T  # (2B, 2N)
  cols = jnp.arange(keys.shape[0])[None, :]
  valid = (cols != self_idx[:, None]) & (cols != pos_idx[:, None])
  pos = jnp.take_along_axis(cos, pos_idx[:, None], axis=1)[:, 0]
  return pos, cos, valid
