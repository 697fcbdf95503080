"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018, InstDisc).

Features are L2-normalised, so the similarity is the cosine. Each test query takes its k most
similar training examples; neighbour j votes for its class with weight exp(s_j / T), and the
class with the largest summed vote wins. This is the cheap, hyper-parameter-light monitor of
representation quality used by InstDisc, MoCo and CMC: no training, so it can run every few
hundred steps. The test queries are processed in fixed-size chunks under `lax.map`, so memory
stays at O(chunk x N_train) whatever the test-set size, and one compiled shape serves all calls
with the same sizes.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk"))
def knn_predict(train_feats: jax.Array, train_labels: jax.Array, test_feats: jax.Array, *,
                num_classes: int, k: int, temperature: float, chunk: int = 256) -> jax.Array:
  """Weighted-kNN class predictions (N_test,) int32 for `test_feats`.

  Args:
    train_feats: (N, D) memory features (normalised here).
    train_labels: (N,) int labels in [0, num_classes).
    test_feats: (M, D) query features (normalised here).
    num_classes: number of classes.
    k: neighbours per query (clipped to N).
    temperature: T of the exp(sim / T) vote weights.
    chunk: queries per block; bounds the (chunk, N) similarity matrix.

  Returns:
    (M,) int32 predicted classes; ties go to the lowest class index.
  """
  chex.assert_rank([train_feats, train_labels, test_feats], [2, 1, 2])
  chex.assert_equal_shape_prefix([train_feats, train_labels], 1)
  chex.assert_equal(train_feats.shape[1], test_feats.shape[1])
  k = min(int(k), train_feats.shape[0])
  memory = l2_normalize(train_feats.astype(jnp.float32))
  onehot = jax.nn.one_hot(train_labels, num_classes, dtype=jnp.float32)
  m = test_feats.shape[0]
  blocks = -(-m // chunk)
  queries = jnp.pad(l2_normalize(test_feats.astype(jnp.float32)),
                    ((0, blocks * chunk - m), (0, 0)))

  def predict(q):  # (chunk, D) -> (chunk,)
    sims, idx = jax.lax.top_k(q @ memory.T, k)
    # Subtracting each query's best similarity leaves the argmax unchanged and keeps
    # exp() finite for small temperatures.
    weights = jnp.exp((sims - sims[:, :1]) / temperature)
    votes = jnp.einsum("qk,qkc->qc", weights, onehot[idx])
    return jnp.argmax(votes, axis=-1).astype(jnp.int32)

  preds = jax.lax.map(predict, queries.reshape(blocks, chunk, -1))
  return preds.reshape(-1)[:m]


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 256) -> float:
  """Top-1 accuracy (percent) of the weighted kNN classifier of `knn_predict`.

  Inputs may be numpy or jax arrays; features (N, D) / (M, D), labels (N,) / (M,).
  """
  test_labels = np.asarray(test_labels)
  chex.assert_shape(test_labels, (np.shape(test_feats)[0],))
  if test_labels.shape[0] == 0:
    raise ValueError("knn_accuracy needs at least one test example.")
  chunk = int(max(1, min(chunk, test_labels.shape[0])))
  preds = knn_predict(jnp.asarray(train_feats), jnp.asarray(train_labels, jnp.int32),
                      jnp.asarray(test_feats), num_classes=int(num_classes), k=int(k),
                      temperature=float(temperature), chunk=chunk)
  return float(np.mean(np.asarray(preds) == test_labels) * 100.0)
