"""SimCLR's NT-Xent (cross-device negatives) and the paper's score d; the InfoNCE family from
scores is in negatives.py, its adapters for ContrastBatches in adapters.py."""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

# Added to the logit of an anchor with itself: exp() of it underflows to exactly 0 in float32,
# and unlike -inf it keeps every derivative finite.
_SELF_MASK = 1e9


def _float(x: jax.Array) -> jax.Array:
  """Promotes to at least float32 (bfloat16 -> float32; float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def score_from_cosine(cos: jax.Array) -> jax.Array:
  """The paper's d(.) in [0, 1] from a cosine: (cos + 1) / 2 (docs/metaug.md §3.4)."""
  return (cos + 1.0) / 2.0


def in_batch_pairs(z1: jax.Array, z2: jax.Array, axis_name: Optional[str] = None):
  """SimCLR's in-batch layout: the 2B local anchors [z1; z2], the 2N keys of the global batch
  [all z1; all z2] (gathered over `axis_name` in device order), and for each anchor the key
  column of itself and of its positive (its other view).

  Returns:
    anchors (2B, D), keys (2N, D), self_idx (2B,), pos_idx (2B,), at least float32.
  """
  chex.assert_rank([z1, z2], 2)
  chex.assert_equal_shape([z1, z2])
  z1, z2 = _float(z1), _float(z2)
  b = z1.shape[0]
  if axis_name is None:
    g1, g2, offset = z1, z2, 0
  else:
    g1 = jax.lax.all_gather(z1, axis_name, tiled=True)
    g2 = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * b
  n = g1.shape[0]
  local = jnp.arange(b) + offset
  return (jnp.concatenate([z1, z2], axis=0), jnp.concatenate([g1, g2], axis=0),
          jnp.concatenate([local, local + n]), jnp.concatenate([local + n, local]))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float,
            axis_name: Optional[str] = None) -> jax.Array:
  """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1) on L2-normalised embeddings of two views.

  Each of the 2B local anchors has its other view as positive and every other embedding of
  the global batch (2N - 2, both views, all devices when `axis_name` is given) as negatives.
  Returns the mean over this device's 2B anchors; under pmap, pmean of the value (and of the
  per-device gradients) equals the single-device loss (gradient) on the whole batch.

  Args:
    z1: (B, D) local embeddings of view 1.
    z2: (B, D) local embeddings of view 2, row i the positive of z1 row i.
    temperature: the softmax temperature tau.
    axis_name: pmap / shard_map axis to gather negatives over, or None.
  Returns:
    A scalar.
  """
  anchors, keys, self_idx, pos_idx = in_batch_pairs(z1, z2, axis_name)
  logits = anchors @ keys.T / temperature  # (2B, 2N)
  cols = jnp.arange(keys.shape[0])
  logits = logits - _SELF_MASK * (cols[None, :] == self_idx[:, None])
  pos = jnp.take_along_axis(logits, pos_idx[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)
