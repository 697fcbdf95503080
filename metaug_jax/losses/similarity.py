"""Losses without negatives: SimSiam's and BYOL's cosine losses and Barlow Twins.

SimSiam and BYOL compare a prediction p of one view with the stop-gradient target z of the
other; Barlow Twins drives the cross-correlation of two views' standardised embeddings to the
identity. Barlow Twins' statistics are over the global batch (pmean / psum over `axis_name`),
so its value and its pmean'd gradient do not depend on the number of devices.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from metaug_jax.losses.contrastive import _float
from metaug_jax.models.layers import l2_normalize

# BatchNorm1d's epsilon, which the Barlow Twins code standardises with (no affine part).
BARLOW_EPS = 1e-5


def _cosine_to_target(p: jax.Array, z: jax.Array) -> jax.Array:
  """(B,) cosine of each prediction row with its stop-gradient target row."""
  chex.assert_rank([p, z], 2)
  chex.assert_equal_shape([p, z])
  p, z = _float(p), jax.lax.stop_gradient(_float(z))
  return jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1)


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
  """SimSiam's D(p, stopgrad(z)) = -p/|p| . z/|z| (Chen & He 2021, Eq. 1 with Eq. 3), mean.

  Args:
    p: (B, D) predictions (carry gradient).
    z: (B, D) targets (no gradient reaches them).
  Returns:
    A scalar: the mean over the B rows.
  """
  return -jnp.mean(_cosine_to_target(p, z))


def symmetric_negative_cosine(p1: jax.Array, p2: jax.Array, z1: jax.Array,
                              z2: jax.Array) -> jax.Array:
  """SimSiam's loss (D(p1, sg(z2)) + D(p2, sg(z1))) / 2 (Chen & He 2021, Eq. 2 with Eq. 4).

  p_v and z_v are view v's (B, D) predictions and projections; returns a scalar.
  """
  return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def byol_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL's |p/|p| - z/|z||^2 = 2 - 2 cos(p, sg(z)) (Grill et al. 2020, Eq. 2), mean over rows.

  The method symmetrises by adding the loss with the views swapped (their Eq. 2's L + L~).

  Args:
    p: (B, D) online predictions q_theta(z_theta).
    z: (B, D) target projections z'_xi (no gradient reaches them).
  Returns:
    A scalar.
  """
  return jnp.mean(2.0 - 2.0 * _cosine_to_target(p, z))


def _global_mean(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Mean over axis 0 of the global batch (equal local batches on every device)."""
  m = jnp.mean(x, axis=0)
  return m if axis_name is None else jax.lax.pmean(m, axis_name)


def _standardise(z: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """(z - mean) / sqrt(biased var + eps), statistics per dimension over the global batch."""
  mean = _global_mean(z, axis_name)
  var = _global_mean(jnp.square(z - mean), axis_name)
  return (z - mean) * jax.lax.rsqrt(var + BARLOW_EPS)


def barlow_twins(z1: jax.Array, z2: jax.Array, lambda_offdiag: float = 0.0051,
                 axis_name: Optional[str] = None) -> jax.Array:
  """Barlow Twins' sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 (Zbontar et al. 2021, Eq. 1).

  C (their Eq. 2) is the cross-correlation of the two views' embeddings, each standardised
  along the batch (as their code does, with BatchNorm's eps): C = z1n^T z2n / N. With
  `axis_name` the statistics and C are over the global batch of N rows (pmean / psum), so
  every device returns the same value and the pmean of the per-device gradients is the
  gradient of the whole batch's loss. Every device must hold the same number of rows.

  Args:
    z1: (B, D) local embeddings of view 1 (the projector's output).
    z2: (B, D) local embeddings of view 2, row i the same example as z1 row i.
    lambda_offdiag: lambda, the weight of the redundancy-reduction term.
    axis_name: pmap / shard_map axis the batch is split over, or None.
  Returns:
    A scalar.
  """
  chex.assert_rank([z1, z2], 2)
  chex.assert_equal_shape([z1, z2])
  z1, z2 = _float(z1), _float(z2)
  n = z1.shape[0] if axis_name is None else jax.lax.psum(z1.shape[0], axis_name)
  cross = _standardise(z1, axis_name).T @ _standardise(z2, axis_name)  # (D, D)
  if axis_name is not None:
    cross = jax.lax.psum(cross, axis_name)
  c = cross / n
  on_diag = jnp.diagonal(c)
  invariance = jnp.sum(jnp.square(1.0 - on_diag))
  off_diag = ~jnp.eye(c.shape[0], dtype=bool)
  redundancy = jnp.sum(jnp.where(off_diag, jnp.square(c), 0.0))
  return invariance + lambda_offdiag * redundancy
