"""Memory bank: unit-norm rows, the momentum update, a bank call's ContrastBatches and scores,
device-independent sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import memory_bank, parallel


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_init_rows_are_unit_norm():
  banks = memory_bank.init_banks(jax.random.PRNGKey(0), 3, 50, 16)
  assert banks.shape == (3, 50, 16)
  np.testing.assert_allclose(np.linalg.norm(banks, axis=-1), 1.0, atol=1e-5)


def test_update_is_normalised_momentum_average_of_batch_rows_only():
  rng = np.random.default_rng(0)
  banks = jnp.asarray(_unit(rng.normal(size=(2, 10, 4))), jnp.float32)
  index = jnp.array([7, 2, 5])
  feats = [jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32) for _ in range(2)]
  new = np.asarray(memory_bank.update(banks, index, feats, 0.5))
  for v in range(2):
    expected = _unit(0.5 * np.asarray(banks[v, index]) + 0.5 * np.asarray(feats[v]))
    np.testing.assert_allclose(new[v, index], expected, atol=1e-6)
    others = np.setdiff1d(np.arange(10), np.asarray(index))
    np.testing.assert_array_equal(new[v, others], np.asarray(banks[v, others]))
  np.testing.assert_allclose(np.linalg.norm(new, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dense", [None, True, False])
def test_bank_call_gives_every_direction_as_a_contrast_batch_and_scores_it(dense):
  rng = np.random.default_rng(1)
  banks = jnp.asarray(_unit(rng.normal(size=(3, 20, 8))), jnp.float32)
  queries = [jnp.asarray(_unit(rng.normal(size=(4, 8))), jnp.float32) for _ in range(3)]
  originals = [jnp.asarray(_unit(rng.normal(size=(4, 8))), jnp.float32) for _ in range(3)]
  idx = jnp.asarray(rng.integers(0, 20, size=(4, 6)), jnp.int32)
  call = memory_bank.BankCall(banks, idx, dense=dense)
  batches = call.contrast_batches(queries, originals)
  dirs = memory_bank.directions(3)
  assert len(batches) == len(dirs) == 6
  for batch, (x, y) in zip(batches, dirs):
    rows = np.asarray(banks)[y][np.asarray(idx)]                       # (4, 6, 8)
    assert batch.anchor is queries[x] and batch.to_enqueue is originals[x]
    np.testing.assert_array_equal(batch.positive, rows[:, :1])        # the anchor's own row
    np.testing.assert_array_equal(batch.negatives, rows[:, 1:])
    expected = np.einsum("bd,bkd->bk", np.asarray(queries[x]), rows)
    np.testing.assert_allclose(call.scorer(batch), expected, atol=1e-6)
  scores = memory_bank.split_scores(jnp.stack([call.scorer(b) for b in batches], axis=1))
  assert scores[0].shape == (4, 6) and scores[1].shape == (4, 30)


def test_bank_call_scores_rewritten_rows_as_they_are():
  rng = np.random.default_rng(4)
  banks = jnp.asarray(_unit(rng.normal(size=(2, 10, 4))), jnp.float32)
  q = [jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32) for _ in range(2)]
  call = memory_bank.BankCall(banks, jnp.asarray(rng.integers(0, 10, size=(3, 5)), jnp.int32),
                              dense=True)
  batch = call.contrast_batches(q, q)[0]
  halved = batch.replace(negatives=0.5 * batch.negatives)   # what an augmenter might do
  np.testing.assert_allclose(call.scorer(halved)[:, 1:], 0.5 * call.scorer(batch)[:, 1:],
                             atol=1e-6)
  np.testing.assert_allclose(call.scorer(halved)[:, 0], call.scorer(batch)[:, 0], atol=1e-6)


def test_drawn_indices_do_not_depend_on_device_count():
  key = jax.random.PRNGKey(3)
  anchors = np.arange(8, dtype=np.int32) + 100

  def draw(anchor):
    return memory_bank.draw_indices(key, anchor, 8, 5, 1000)

  out = {}
  for n in (1, 4):
    f = jax.pmap(draw, axis_name=parallel.AXIS, devices=jax.devices()[:n])
    out[n] = np.asarray(f(anchors.reshape(n, 8 // n))).reshape(8, 6)
  np.testing.assert_array_equal(out[1], out[4])
  np.testing.assert_array_equal(out[1][:, 0], anchors)   # column 0 is the anchor's own row
  assert out[1][:, 1:].min() >= 0 and out[1][:, 1:].max() < 1000


def test_dense_and_gathered_scoring_have_the_same_gradients():
  """Dense scoring (whole bank, then pick columns) = gathering rows: same query gradient,
  including repeated indices (collisions), and no gradient into the banks either way."""
  rng = np.random.default_rng(2)
  banks = jnp.asarray(_unit(rng.normal(size=(2, 30, 8))), jnp.float32)
  queries = [jnp.asarray(_unit(rng.normal(size=(5, 8))), jnp.float32) for _ in range(2)]
  idx = jnp.asarray(rng.integers(0, 30, size=(5, 40)), jnp.int32)      # many repeats
  weights = jnp.asarray(rng.normal(size=(5, 2, 40)), jnp.float32)

  def loss(q, b, dense):
    call = memory_bank.BankCall(b, idx, dense=dense)
    scores = jnp.stack([call.scorer(c) for c in call.contrast_batches(q, q)], axis=1)
    return jnp.sum(jnp.sin(3 * scores) * weights)

  g_dense = jax.grad(loss, argnums=(0, 1))(queries, banks, True)
  g_gather = jax.grad(loss, argnums=(0, 1))(queries, banks, False)
  for a, b in zip(g_dense[0], g_gather[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g_dense[1]).max()) == 0.0 == float(jnp.abs(g_gather[1]).max())
