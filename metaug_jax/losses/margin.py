"""Margin-injected regularisation (docs/metaug.md §4.3, decision A4; paper Eq. 5 per issue #2)."""

from typing import Sequence

import chex
import jax
import jax.numpy as jnp

MARGIN_TYPES = ("large", "medium", "small")


def code_exact_columns(directions: Sequence[tuple[int, int]],
                       view: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(threshold, penalised) direction indices of the call S_view under the authors' rule.

  `util.margin_injection_loss_calc` (docs/metaug.md §4.3): in the call where view v is
  augmented, a direction (query x, bank y) gives threshold scores if it touches v neither as
  query nor as bank (x != v and y != v), and is penalised otherwise. With 3 views that is 2
  threshold and 4 penalised directions per call: 6 and 12 over S_1..S_3. With 2 views every
  direction touches v, the rule leaves no threshold scores, and this raises ValueError.

  Args:
    directions: the calls' (query view, bank view) pairs, in their column order.
    view: the augmented view v of the call.
  Returns:
    (indices of the threshold directions, indices of the penalised directions).
  """
  touches = [view in d for d in directions]
  thresholds = tuple(i for i, t in enumerate(touches) if not t)
  penalised = tuple(i for i, t in enumerate(touches) if t)
  if not thresholds:
    views = len({x for d in directions for x in d})
    raise ValueError(
        f"metaug.margin_code_exact needs >= 3 views: with {views}, every direction of the call "
        f"S_{view} touches the augmented view, so the authors' rule has no scores to take "
        f"thresholds from; pass --config.metaug.margin_code_exact=False (thresholds from S0).")
  return thresholds, penalised


def margin_thresholds(orig_pos: jax.Array, orig_neg: jax.Array,
                      margin_type: str) -> tuple[jax.Array, jax.Array]:
  """Per-anchor thresholds (sigma+, sigma-) from the ORIGINAL features' scores (§4.3 there).

  With p_min the row's smallest positive score and n_max its largest negative score:
  "large": sigma+ = min(p_min, n_max), sigma- = max(p_min, n_max); "small": swapped;
  "medium": both (p_min + n_max) / 2. Not detached: the caller decides (decision A4).

  Args:
    orig_pos: (B, P) original positive scores.
    orig_neg: (B, N) original negative scores.
    margin_type: "large", "medium" or "small".
  Returns:
    sigma_pos (B,), sigma_neg (B,).
  """
  chex.assert_rank([orig_pos, orig_neg], 2)
  chex.assert_equal(orig_pos.shape[0], orig_neg.shape[0])
  p_min = jnp.min(orig_pos, axis=1)
  n_max = jnp.max(orig_neg, axis=1)
  if margin_type == "large":
    return jnp.minimum(p_min, n_max), jnp.maximum(p_min, n_max)
  if margin_type == "small":
    return jnp.maximum(p_min, n_max), jnp.minimum(p_min, n_max)
  if margin_type == "medium":
    mid = (p_min + n_max) / 2.0
    return mid, mid
  raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")


def margin_regularizer(aug_pos: jax.Array, aug_neg: jax.Array, sigma_pos: jax.Array,
                       sigma_neg: jax.Array, *, pos_scale: float = 1.0) -> jax.Array:
  """R = pos_scale * mean_{i,k}[p~_ik - sigma+_i]_+ + mean_{i,j}[sigma-_i - n~_ij]_+ (§4.3).

  The code's form (means, not the paper's sums); pos_scale = 1e-4 reproduces the code's
  hard-coded `margin_hyper` on the positive part.

  Args:
    aug_pos: (B, P') positive scores of augmented-query pairs.
    aug_neg: (B, N') negative scores of augmented-query pairs.
    sigma_pos: (B,) threshold for the positives.
    sigma_neg: (B,) threshold for the negatives.
    pos_scale: weight of the positive part.
  Returns:
    A scalar.
  """
  chex.assert_rank([aug_pos, aug_neg, sigma_pos, sigma_neg], [2, 2, 1, 1])
  chex.assert_equal_shape_prefix([aug_pos, aug_neg, sigma_pos, sigma_neg], 1)
  pos_term = jnp.mean(jax.nn.relu(aug_pos - sigma_pos[:, None]))
  neg_term = jnp.mean(jax.nn.relu(sigma_neg[:, None] - aug_neg))
  return pos_scale * pos_term + neg_term
