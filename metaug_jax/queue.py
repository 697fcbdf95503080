"""MoCo's queue of keys (He et al., CVPR 2020, Sec. 3.2) as pure functions on a small pytree.

The queue is a FIFO dictionary of K unit-norm keys from earlier batches: each step scores the
queries against it (`scores`, the negatives of `infonce_from_scores`) and then writes the
step's keys over the oldest entries (`enqueue`). It lives replicated in the train state; the
caller gathers the global batch of keys over devices (`parallel.gather_rows`) before
enqueueing, so every device writes the same rows and the replicas stay equal. Keys never
carry gradient.
"""

import chex
import flax
import jax
import jax.numpy as jnp

from metaug_jax.models.layers import l2_normalize


@flax.struct.dataclass
class KeyQueue:
  """K keys and the row the next key goes to.

  keys: (K, D) float32 unit-norm rows.
  ptr: int32 scalar in [0, K), the oldest row (the next to be overwritten).
  """
  keys: jax.Array
  ptr: jax.Array

  @property
  def size(self) -> int:
    return self.keys.shape[0]


def init_queue(key: jax.Array, size: int, dim: int) -> KeyQueue:
  """K random unit rows (normal draws, normalised, as MoCo initialises its queue), ptr 0."""
  keys = l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))
  return KeyQueue(keys=keys, ptr=jnp.zeros((), jnp.int32))


def enqueue(queue: KeyQueue, keys_global: jax.Array) -> KeyQueue:
  """Writes the G keys of the global batch at rows ptr, ptr+1, ... (mod K); ptr += G (mod K).

  Unlike MoCo's code, K need not be a multiple of G: the write wraps around the end.

  Args:
    queue: the current queue.
    keys_global: (G, D) keys of the whole global batch (already gathered over devices),
      G <= K; treated as constants.
  Returns:
    The new queue.
  Raises:
    ValueError (at trace time) if G > K, which would overwrite keys of the same batch.
  """
  chex.assert_rank(keys_global, 2)
  chex.assert_equal(keys_global.shape[1], queue.keys.shape[1])
  chex.assert_rank(queue.ptr, 0)
  g, k = keys_global.shape[0], queue.size
  if g > k:
    raise ValueError(f"cannot enqueue a batch of {g} keys into a queue of {k}")
  rows = (queue.ptr + jnp.arange(g, dtype=jnp.int32)) % k
  new = jax.lax.stop_gradient(keys_global).astype(queue.keys.dtype)
  return KeyQueue(keys=queue.keys.at[rows].set(new),
                  ptr=((queue.ptr + g) % k).astype(jnp.int32))


def scores(q: jax.Array, queue: KeyQueue) -> jax.Array:
  """Dot products (cosines for unit q) of each query with every queued key: (B, K).

  The queue is a constant: no gradient reaches its keys.
  """
  chex.assert_rank(q, 2)
  chex.assert_equal(q.shape[1], queue.keys.shape[1])
  return q @ jax.lax.stop_gradient(queue.keys).T
