"""Per-view memory banks in the CMC "NCE-average" style (docs/metaug.md §3.3), as plain arrays.

The banks are one (V, N, D) array inside the train state: row n of bank v is a running,
unit-norm average of view v's embedding of example n. A "bank call" (docs/metaug.md §4.2)
scores the queries of every view against the *other* views' banks at K+1 sampled rows per
anchor, column 0 being the anchor's own row (the positive). Banks never carry gradient.
"""

import itertools
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp

from metaug_jax import feature_aug, parallel
from metaug_jax.models.layers import l2_normalize


def init_banks(key: jax.Array, num_views: int, size: int, dim: int,
               unit_norm: bool = True) -> jax.Array:
  """CMC's U(-s, s) initialisation with s = 1/sqrt(dim/3), rows then made unit-norm.

  unit_norm=False keeps the raw uniform rows (expected squared norm dim * s^2 / 3 = 1), as the
  authors' code does (bank.schedule="code_exact", docs/metaug.md §3.3); a row is normalised by
  its first update either way.
  """
  scale = 1.0 / jnp.sqrt(dim / 3.0)
  banks = jax.random.uniform(key, (num_views, size, dim), jnp.float32, -scale, scale)
  return l2_normalize(banks) if unit_norm else banks


def directions(num_views: int) -> tuple[tuple[int, int], ...]:
  """The ordered cross-view pairs (query view x, bank view y), x != y: V(V-1) of them."""
  return tuple(itertools.permutations(range(num_views), 2))


def sample_negatives(key: jax.Array, global_batch: int, num_negatives: int,
                     bank_size: int) -> jax.Array:
  """Uniform bank rows, (global_batch, K), drawn for the whole global batch (docs/metaug.md,
  decision A13).

  Drawing for the global batch and slicing per device keeps the negatives of an example
  independent of the device count. Collisions with the anchor are kept, as in CMC.
  """
  return jax.random.randint(key, (global_batch, num_negatives), 0, bank_size, jnp.int32)


def call_indices(anchor_index: jax.Array, negatives: jax.Array) -> jax.Array:
  """(B, K+1) bank indices: the anchor's own row in column 0, then its negatives."""
  chex.assert_rank([anchor_index, negatives], [1, 2])
  return jnp.concatenate([anchor_index[:, None], negatives], axis=1)


def gather(banks: jax.Array, indices: jax.Array) -> jax.Array:
  """Rows of every bank at (B, K+1) indices: (V, B, K+1, D), without gradient."""
  return jax.lax.stop_gradient(banks)[:, indices]


def draw_indices(key: jax.Array, anchor_index: jax.Array, global_batch: int,
                 num_negatives: int, bank_size: int) -> jax.Array:
  """This device's (B, K+1) call indices, drawn for the global batch and sliced (decision A13)."""
  negatives = sample_negatives(key, global_batch, num_negatives, bank_size)
  negatives = parallel.local_rows(negatives, anchor_index.shape[0])
  return call_indices(anchor_index, negatives)


# Banks up to this many times the K+1 rows of a call are scored densely (see BankCall).
DENSE_SCORING_MAX_ROWS_PER_CALL_ROW = 64


class BankCall:
  """One bank call (docs/metaug.md §4.2): every view's query against the other views' banks
  at the same (B, K+1) sampled rows, handed to a loss as one `ContrastBatch` per direction.

  `contrast_batches(queries, originals)` gives, for each direction (x, y) of `directions(V)`,
  anchor = query x, positive = its own row of bank y (column 0), negatives = the K sampled rows
  of bank y, to_enqueue = the original embedding x (never the query, which may be augmented).
  The rows carry no gradient.

  `scorer(batch)` gives a direction's (B, 1 + K) dot products. Rows that no augmenter replaced
  (the very arrays `contrast_batches` put in) are scored densely while the bank is small
  (N <= 64 (K+1)): each query against the whole bank, (B, D) x (D, N), then the (B, K+1)
  columns picked. That never materialises the gathered rows, which every differentiation pass
  of MetAug's step would otherwise keep (96 MiB per call at the paper's batch 64, K 1024,
  3 views); the gather is then dead code that XLA removes. Both ways give the same scores and
  gradients (tested). Otherwise untouched rows are scored from the gathered (B, K+1, D) rows as
  a whole, and rows an augmenter rewrote as they are.
  """

  def __init__(self, banks: jax.Array, indices: jax.Array, dense: Optional[bool] = None):
    """banks: (V, N, D), treated as a constant; indices: (B, K+1), column 0 the anchor's own
    row; dense: force one way of scoring untouched rows (None: by the bank size)."""
    chex.assert_rank([banks, indices], [3, 2])
    self.banks = jax.lax.stop_gradient(banks)
    self.indices = indices
    self.dense = (banks.shape[1] <= DENSE_SCORING_MAX_ROWS_PER_CALL_ROW * indices.shape[1]
                  if dense is None else dense)
    self._rows = gather(self.banks, indices)                 # (V, B, K+1, D)
    self._positive = [self._rows[y][:, :1] for y in range(banks.shape[0])]
    self._negatives = [self._rows[y][:, 1:] for y in range(banks.shape[0])]

  def contrast_batches(self, queries: Sequence[jax.Array],
                       originals: Sequence[jax.Array]) -> tuple:
    """One ContrastBatch per direction, in `directions(V)` order.

    Args:
      queries: V arrays (B, D), the unit-norm queries of this call (original or augmented).
      originals: V arrays (B, D), the original embeddings (`to_enqueue`).
    """
    chex.assert_equal_shape(list(queries) + list(originals))
    return tuple(
        feature_aug.ContrastBatch(anchor=queries[x], positive=self._positive[y],
                                  negatives=self._negatives[y], to_enqueue=originals[x])
        for x, y in directions(len(queries)))

  def _untouched_bank(self, batch: feature_aug.ContrastBatch) -> Optional[int]:
    """The bank y whose rows `batch` still holds unchanged, or None."""
    for y, (pos, neg) in enumerate(zip(self._positive, self._negatives)):
      if batch.positive is pos and batch.negatives is neg:
        return y
    return None

  def scorer(self, batch: feature_aug.ContrastBatch) -> jax.Array:
    """(B, 1 + K) dot products of a direction's anchor with its positive and negatives."""
    y = self._untouched_bank(batch)
    if y is None or batch.extra_positive is not None or batch.extra_negative is not None:
      pos = feature_aug.positive_scores(batch)
      return jnp.concatenate([pos, feature_aug.negative_scores(batch)], axis=1)
    if not self.dense:   # the call's gathered rows, whole (no copies of their slices)
      return jnp.einsum("bd,bkd->bk", batch.anchor, self._rows[y])
    cos_all = jnp.einsum("bd,nd->bn", batch.anchor, self.banks[y])
    return jnp.take_along_axis(cos_all, self.indices, axis=1)


def split_scores(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, P, K+1) call scores -> positives (B, P) and all negatives flattened (B, P*K)."""
  pos = scores[:, :, 0]
  neg = scores[:, :, 1:].reshape(scores.shape[0], -1)
  return pos, neg


def update(banks: jax.Array, index: jax.Array, features: Sequence[jax.Array],
           momentum: float) -> jax.Array:
  """m <- normalise(momentum * m + (1 - momentum) * z) at the given rows of every bank.

  Args:
    banks: (V, N, D).
    index: (B,) rows to update (the global batch, identical on every device).
    features: V arrays (B, D) of original (never augmented) embeddings.
    momentum: CMC's nce_m (0.5).
  """
  feats = jax.lax.stop_gradient(jnp.stack(features)).astype(banks.dtype)
  chex.assert_equal(feats.shape[:2], (banks.shape[0], index.shape[0]))
  old = banks[:, index]
  new = l2_normalize(momentum * old + (1.0 - momentum) * feats)
  return banks.at[:, index].set(new)
