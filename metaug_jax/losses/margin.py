"""Margin-injected regularisation (docs/metaug.md §4.3, decision A4; paper Eq. 5 per issue #2)."""

import chex
import jax
import jax.numpy as jnp

MARGIN_TYPES = ("large", "medium", "small")


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
