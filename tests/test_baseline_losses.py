"""The baselines' building blocks against direct NumPy float64 formulas, and 1 vs 4 devices.

InfoNCE with plain / debiased / hard negatives, SimCLR's in-batch scores, MoCo's queue, the
EMA target updates, SimSiam's and BYOL's cosine losses and Barlow Twins.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import ema, parallel
from metaug_jax import queue as queue_lib
from metaug_jax.losses import (barlow_twins, byol_loss, infonce_from_scores, negative_cosine,
                               nt_xent, nt_xent_scores, symmetric_negative_cosine)
from metaug_jax.models.layers import l2_normalize

N_DEV = 4


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _shard(a):
  return a.reshape((N_DEV, -1) + a.shape[1:])


def _needs_devices():
  if jax.local_device_count() < N_DEV:
    pytest.skip("needs 4 devices (tests/conftest.py simulates them)")


# ---- NumPy references, one anchor and one negative at a time --------------------------------

def _np_infonce(pos, neg, t, valid=None, negatives="plain", tau_plus=0.1, beta=1.0):
  """The three estimators as written in Chuang et al. 2020 (Eq. 10) / Robinson et al. 2021
  (Eq. 3-4), in float64 with explicit loops; no shifting (float64 has the range)."""
  b, k = neg.shape
  valid = np.ones((b, k), bool) if valid is None else valid
  out = []
  for i in range(b):
    e_pos = math.exp(pos[i] / t)
    e_neg = [math.exp(neg[i, j] / t) for j in range(k) if valid[i, j]]
    n = len(e_neg)
    if negatives == "plain":
      ng = sum(e_neg)
    else:
      if negatives == "hard":
        imp = [math.exp(beta * neg[i, j] / t) for j in range(k) if valid[i, j]]
        mean_imp = sum(imp) / n
        total = sum(w / mean_imp * e for w, e in zip(imp, e_neg))
      else:
        total = sum(e_neg)
      ng = max((total - n * tau_plus * e_pos) / (1 - tau_plus), n * math.exp(-1 / t))
    out.append(math.log1p(ng / e_pos))  # -log(e_pos / (e_pos + ng)), accurate for ng << e_pos
  return np.array(out)


def _random_scores(seed, b=5, k=9, masked=True):
  rng = np.random.default_rng(seed)
  pos = rng.uniform(-1, 1, b)
  neg = rng.uniform(-1, 1, (b, k))
  valid = rng.uniform(size=(b, k)) > 0.3 if masked else np.ones((b, k), bool)
  valid[:, 0] = True  # at least one negative per anchor
  return pos, neg, valid


def _jax64(fn, *arrays, **kwargs):
  with jax.enable_x64(True):
    got = fn(*(jnp.asarray(a) for a in arrays), **kwargs)
    assert got.dtype == jnp.float64
    return np.asarray(got)


# ---- infonce_from_scores ---------------------------------------------------------------------

# Jitted once per mode, shape and dtype: dispatching every op eagerly is what costs time here.
_infonce = jax.jit(infonce_from_scores, static_argnames=("negatives",))


@functools.partial(jax.jit, static_argnames=("negatives",))
def _infonce_and_grads(pos, neg, temperature, valid=None, negatives="plain", tau_plus=0.1,
                       beta=1.0):
  """The per-anchor losses and the gradients of their sum w.r.t. pos and neg."""
  def total(p, n):
    return jnp.sum(infonce_from_scores(p, n, temperature, valid=valid, negatives=negatives,
                                       tau_plus=tau_plus, beta=beta))
  return (infonce_from_scores(pos, neg, temperature, valid=valid, negatives=negatives,
                              tau_plus=tau_plus, beta=beta),
          *jax.grad(total, argnums=(0, 1))(pos, neg))


def test_plain_hand_built():
  pos = np.array([0.5, 0.0])
  neg = np.array([[0.1, -0.3, 0.9], [0.2, 0.2, 0.2]])
  t = 0.5
  want = [math.log(math.exp(1.0) + math.exp(0.2) + math.exp(-0.6) + math.exp(1.8)) - 1.0,
          math.log(1.0 + 3 * math.exp(0.4))]
  got = _jax64(_infonce, pos, neg, temperature=t)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(got, _np_infonce(pos, neg, t), rtol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(negatives="plain"),
    dict(negatives="debiased", tau_plus=0.1),
    dict(negatives="debiased", tau_plus=0.3),
    dict(negatives="hard", tau_plus=0.1, beta=1.0),
    dict(negatives="hard", tau_plus=0.05, beta=0.5),
    dict(negatives="hard", tau_plus=0.0, beta=2.0),
])
@pytest.mark.parametrize("t", [0.5, 0.07])
@pytest.mark.parametrize("masked", [False, True])
def test_infonce_matches_numpy(kwargs, t, masked):
  pos, neg, valid = _random_scores(1, masked=masked)
  got = _jax64(_infonce, pos, neg, temperature=t,
               valid=jnp.asarray(valid) if masked else None, **kwargs)
  want = _np_infonce(pos, neg, t, valid if masked else None, **kwargs)
  assert got.shape == (pos.shape[0],)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_debiased_without_prior_is_plain_and_hard_without_beta_is_debiased():
  pos, neg, valid = _random_scores(2, b=7, k=12)
  plain = _jax64(_infonce, pos, neg, temperature=0.2, valid=valid)
  debiased0 = _jax64(_infonce, pos, neg, temperature=0.2, valid=valid,
                     negatives="debiased", tau_plus=0.0)
  np.testing.assert_allclose(debiased0, plain, rtol=1e-12)
  debiased = _jax64(_infonce, pos, neg, temperature=0.2, valid=valid,
                    negatives="debiased", tau_plus=0.2)
  hard0 = _jax64(_infonce, pos, neg, temperature=0.2, valid=valid,
                 negatives="hard", tau_plus=0.2, beta=0.0)
  np.testing.assert_allclose(hard0, debiased, rtol=1e-12)
  assert np.abs(debiased - plain).max() > 1e-2  # the prior does change the loss here


@pytest.mark.parametrize("negatives", ["debiased", "hard"])
@pytest.mark.parametrize("t", [0.5, 0.07])
def test_clamp_engages(negatives, t):
  """Easy negatives and a strong prior make the estimate negative: Ng = N e^{-1/t}."""
  pos = np.array([0.9, 0.8])
  neg = np.array([[-0.5, -0.6, -0.4, -0.5], [-0.9, -0.2, -0.7, -0.3]])
  tau_plus = 0.5
  n = neg.shape[1]
  for i in range(2):  # the unclamped estimate is negative, for either mode
    e_neg = np.exp(neg[i] / t)
    w = np.exp(neg[i] / t) / np.exp(neg[i] / t).mean() if negatives == "hard" else 1.0
    assert np.sum(w * e_neg) - n * tau_plus * np.exp(pos[i] / t) < 0
  want = np.log1p(n * np.exp(-1 / t) / np.exp(pos / t))
  got = _jax64(_infonce, pos, neg, temperature=t, negatives=negatives,
               tau_plus=tau_plus)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  np.testing.assert_allclose(got, _np_infonce(pos, neg, t, negatives=negatives,
                                              tau_plus=tau_plus), rtol=1e-10)
  # float32 too, where the clamp's e^{-1/t} is taken in the shifted units.
  got32 = _infonce(jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32), t,
                   negatives=negatives, tau_plus=tau_plus)
  np.testing.assert_allclose(np.asarray(got32), want, rtol=2e-3)


@pytest.mark.parametrize("negatives", ["plain", "debiased", "hard"])
def test_float32_small_temperature_no_overflow(negatives):
  """At t = 0.01, e^{s/t} overflows float32 (e^100); the shifted sums do not."""
  pos, neg, valid = _random_scores(3, b=6, k=10)
  pos[0], neg[1, 0] = 1.0, 1.0
  want = _np_infonce(pos, neg, 0.01, valid, negatives=negatives, tau_plus=0.1, beta=1.0)
  got = _infonce(jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32), 0.01,
                 valid=jnp.asarray(valid), negatives=negatives, tau_plus=0.1, beta=1.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("negatives", ["plain", "debiased", "hard"])
def test_masked_scores_are_ignored(negatives):
  pos, neg, valid = _random_scores(4)
  odd = np.arange(neg.size).reshape(neg.shape) % 2 == 1
  changed = np.where(valid, neg, np.where(odd, 1.0, -7.0))
  # t = 0.5 keeps the clamp off, so every valid score has a gradient.
  with jax.enable_x64(True):
    a, _, _ = _infonce_and_grads(pos, neg, 0.5, valid, negatives)
    b, _, grad = _infonce_and_grads(pos, changed, 0.5, valid, negatives)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  grad = np.asarray(grad)
  assert (grad[~valid] == 0).all() and np.isfinite(grad).all()
  assert (grad[valid] != 0).all()


def test_anchor_without_valid_negatives():
  """No negative at all: the loss is -log(1) = 0 in every mode, with finite gradients."""
  pos = jnp.array([0.3, 0.5, 0.0, 0.2])
  neg = jnp.array([[0.1, 0.2, 0.3], [0.4, -0.1, 0.0], [0.5, 0.5, 0.5], [-0.2, 0.1, 0.9]])
  valid = jnp.array([[False] * 3, [True] * 3, [True, False, True], [False, True, False]])
  for negatives in ("plain", "debiased", "hard"):
    value, gp, gn = _infonce_and_grads(pos, neg, 0.1, valid, negatives)
    assert float(value[0]) == 0.0 and (np.asarray(value[1:]) > 0.0).all()
    assert np.isfinite(np.asarray(gp)).all() and np.isfinite(np.asarray(gn)).all()
    assert float(gp[0]) == 0.0 and (np.asarray(gn[0]) == 0).all()


@pytest.mark.parametrize("negatives", ["debiased", "hard"])
def test_gradient_matches_finite_differences(negatives):
  """jax.grad in float64 against central differences of the NumPy reference."""
  pos, neg, valid = _random_scores(5)  # the shapes of the test above: compiled once
  t, h = 0.5, 1e-6  # no row clamped (seed 5): every valid score has a gradient
  with jax.enable_x64(True):
    _, gp, gn = _infonce_and_grads(pos, neg, t, valid, negatives, 0.1, 1.0)

  def total(p, n):
    return _np_infonce(p, n, t, valid, negatives, tau_plus=0.1, beta=1.0).sum()

  fd_p = np.zeros_like(pos)
  for i in range(pos.size):
    e = np.zeros_like(pos)
    e[i] = h
    fd_p[i] = (total(pos + e, neg) - total(pos - e, neg)) / (2 * h)
  fd_n = np.zeros_like(neg)
  for i, j in np.ndindex(neg.shape):
    e = np.zeros_like(neg)
    e[i, j] = h
    fd_n[i, j] = (total(pos, neg + e) - total(pos, neg - e)) / (2 * h)
  np.testing.assert_allclose(np.asarray(gp), fd_p, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(gn), fd_n, rtol=1e-6, atol=1e-8)
  assert np.abs(fd_n[~valid]).max() == 0 and np.abs(fd_n[valid]).min() > 1e-6


@pytest.mark.parametrize("negatives", ["plain", "debiased", "hard"])
def test_gradients_finite_at_extreme_cosines(negatives):
  """Cosines of exactly +-1 at t = 0.07 in float32, clamp engaged in some rows: values, first
  and (for MetAug's meta-gradient) second derivatives are finite."""
  pos = jnp.array([1.0, -1.0, 1.0, -1.0])
  neg = jnp.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
  valid = jnp.ones(neg.shape, bool)  # (the shapes of the test above: compiled once)

  @jax.jit
  def second_order(p, n):
    def grad_norm(p, n):
      _, gp, gn = _infonce_and_grads(p, n, 0.07, valid, negatives, 0.1, 1.0)
      return jnp.sum(gp ** 2) + jnp.sum(gn ** 2)
    return jax.grad(grad_norm, argnums=(0, 1))(p, n)

  value, *grads = _infonce_and_grads(pos, neg, 0.07, valid, negatives, 0.1, 1.0)
  for a in (value, *grads, *second_order(pos, neg)):
    assert np.isfinite(np.asarray(a)).all()
  want = _np_infonce(np.asarray(pos, np.float64), np.asarray(neg, np.float64), 0.07,
                     negatives=negatives, tau_plus=0.1, beta=1.0)
  np.testing.assert_allclose(np.asarray(value), want, rtol=1e-4, atol=1e-5)


def test_infonce_rejects_bad_options():
  pos, neg = jnp.zeros(2), jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="negatives"):
    infonce_from_scores(pos, neg, 0.1, negatives="semi-hard")
  with pytest.raises(ValueError, match="tau_plus"):
    infonce_from_scores(pos, neg, 0.1, negatives="debiased", tau_plus=1.0)
  with pytest.raises(AssertionError):
    infonce_from_scores(pos, neg, 0.1, valid=jnp.ones((2, 4), bool))


# ---- nt_xent_scores --------------------------------------------------------------------------

def _np_nt_xent_scores(z1, z2):
  """Anchors [z1; z2] against keys [z1; z2]: positive i <-> i +- B, neither self nor positive
  a negative."""
  z = np.concatenate([z1, z2])
  m = z.shape[0]
  b = z1.shape[0]
  pos = np.array([z[i] @ z[(i + b) % m] for i in range(m)])
  neg = np.array([[z[i] @ z[j] for j in range(m)] for i in range(m)])
  valid = np.array([[j != i and j != (i + b) % m for j in range(m)] for i in range(m)])
  return pos, neg, valid


def test_nt_xent_scores_match_numpy_and_nt_xent():
  rng = np.random.default_rng(6)
  z1, z2 = _unit(rng.normal(size=(5, 4))), _unit(rng.normal(size=(5, 4)))
  with jax.enable_x64(True):
    scores = jax.jit(nt_xent_scores)(jnp.asarray(z1), jnp.asarray(z2))
    plain = float(jnp.mean(_infonce(scores[0], scores[1], 0.3, valid=scores[2])))
    reference = float(jax.jit(nt_xent)(jnp.asarray(z1), jnp.asarray(z2), 0.3))
  pos, neg, valid = (np.asarray(a) for a in scores)
  want_pos, want_neg, want_valid = _np_nt_xent_scores(z1, z2)
  np.testing.assert_allclose(pos, want_pos, rtol=1e-12)
  np.testing.assert_allclose(neg, want_neg, rtol=1e-12)
  np.testing.assert_array_equal(valid, want_valid)
  assert (valid.sum(axis=1) == 2 * 5 - 2).all()
  np.testing.assert_allclose(plain, reference, rtol=1e-12)
  # The debiased SimCLR loss of Chuang et al. 2020 (their N = 2B - 2).
  debiased = _jax64(_infonce, pos, neg, temperature=0.3, valid=valid,
                    negatives="debiased", tau_plus=0.1)
  np.testing.assert_allclose(
      debiased, _np_infonce(want_pos, want_neg, 0.3, want_valid, "debiased", 0.1), rtol=1e-10)


def _linear_views(w, x1, x2):
  return l2_normalize(x1 @ w), l2_normalize(x2 @ w)


def test_nt_xent_scores_pmap_match_nt_xent():
  """Under pmap, plain InfoNCE on the gathered scores = nt_xent: value and pmean'd gradient,
  both equal to the single-device loss on the whole batch."""
  _needs_devices()
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  x1 = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  x2 = x1 + 0.3 * jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)

  def via_scores(w, a, b, axis_name=None):
    pos, neg, valid = nt_xent_scores(*_linear_views(w, a, b), axis_name)
    return jnp.mean(infonce_from_scores(pos, neg, 0.5, valid=valid))

  def via_nt_xent(w, a, b, axis_name=None):
    return nt_xent(*_linear_views(w, a, b), 0.5, axis_name)

  value, grad = jax.jit(jax.value_and_grad(via_nt_xent))(w, x1, x2)

  def per_device(w, a, b):
    out = []
    for f in (via_scores, via_nt_xent):
      v, g = jax.value_and_grad(f)(w, a, b, parallel.AXIS)
      out += [parallel.pmean(v), parallel.pmean(g)]
    return out

  sv, sg, nv, ng = jax.pmap(per_device, axis_name=parallel.AXIS, in_axes=(None, 0, 0),
                            devices=jax.devices()[:N_DEV])(w, _shard(x1), _shard(x2))
  np.testing.assert_allclose(np.asarray(sv), np.asarray(nv), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sg), np.asarray(ng), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sv[0]), float(value), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sg[0]), np.asarray(grad), rtol=1e-4, atol=1e-6)


# ---- MoCo's queue ----------------------------------------------------------------------------

def test_init_queue():
  q = queue_lib.init_queue(jax.random.key(0), 10, 4)
  assert q.keys.shape == (10, 4) and q.keys.dtype == jnp.float32
  assert q.ptr.dtype == jnp.int32 and q.ptr.shape == () and int(q.ptr) == 0
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q.keys), axis=1), 1.0, rtol=1e-6)
  assert q.size == 10


def test_enqueue_wraps_around():
  """K = 10, G = 4: rows 0-3, then 4-7, then 8, 9, 0, 1; ptr 4, 8, 2."""
  size, dim, g = 10, 3, 4
  q = queue_lib.init_queue(jax.random.key(1), size, dim)
  rows = np.array(q.keys)
  ptr = 0
  step = jax.jit(queue_lib.enqueue)  # ptr traced: the write position is data, not shape
  rng = np.random.default_rng(8)
  for want_ptr in (4, 8, 2):
    batch = _unit(rng.normal(size=(g, dim))).astype(np.float32)
    for i in range(g):
      rows[(ptr + i) % size] = batch[i]
    ptr = (ptr + g) % size
    q = step(q, jnp.asarray(batch))
    assert ptr == want_ptr and int(q.ptr) == want_ptr and q.ptr.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(q.keys), rows)
  # The third batch overwrote the first batch's rows 0, 1 and left its rows 2, 3.
  np.testing.assert_array_equal(np.asarray(q.keys)[[0, 1]], batch[[2, 3]])


def test_enqueue_refuses_batch_larger_than_queue():
  q = queue_lib.init_queue(jax.random.key(2), 6, 3)
  with pytest.raises(ValueError, match="queue of 6"):
    queue_lib.enqueue(q, jnp.ones((7, 3)))
  with pytest.raises(ValueError, match="queue of 6"):
    jax.jit(queue_lib.enqueue)(q, jnp.ones((7, 3)))
  full = jax.jit(queue_lib.enqueue)(q, jnp.ones((6, 3)))  # G = K is a full refresh
  assert int(full.ptr) == 0 and (np.asarray(full.keys) == 1).all()


def test_queue_scores_and_no_gradient():
  rng = np.random.default_rng(9)
  q0 = queue_lib.init_queue(jax.random.key(3), 5, 4)
  query = jnp.asarray(_unit(rng.normal(size=(3, 4))), jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(queue_lib.scores)(query, q0)),
                             np.asarray(query) @ np.asarray(q0.keys).T, rtol=1e-6)
  new_keys = jnp.asarray(_unit(rng.normal(size=(2, 4))), jnp.float32)

  def loss(query, keys, new_keys):
    queue = queue_lib.enqueue(queue_lib.KeyQueue(keys=keys, ptr=q0.ptr), new_keys)
    return jnp.sum(queue_lib.scores(query, queue) ** 2)

  g_query, g_keys, g_new = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(query, q0.keys, new_keys)
  assert np.abs(np.asarray(g_query)).max() > 0
  assert (np.asarray(g_keys) == 0).all() and (np.asarray(g_new) == 0).all()


# ---- EMA targets -----------------------------------------------------------------------------

def test_byol_decay_schedule():
  total, base = 1000, 0.996
  assert math.isclose(float(ema.byol_decay(0, total, base)), base, rel_tol=1e-7)
  assert math.isclose(float(ema.byol_decay(total // 2, total, base)), 1 - (1 - base) / 2,
                      rel_tol=1e-7)
  assert float(ema.byol_decay(total, total, base)) == 1.0
  quarter = 1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2
  traced = jax.jit(ema.byol_decay, static_argnums=(1,))(jnp.int32(250), total)
  assert math.isclose(float(traced), quarter, rel_tol=1e-7)


def test_ema_update_on_params_and_batch_stats():
  target = {"params": {"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([0.0])},
            "batch_stats": {"mean": jnp.array([4.0, -4.0]), "var": jnp.array([1.0, 1.0])}}
  online = {"params": {"w": jnp.array([[3.0, 0.0]]), "b": jnp.array([1.0])},
            "batch_stats": {"mean": jnp.array([0.0, 0.0]), "var": jnp.array([2.0, 3.0])}}
  new = ema.ema_update(target, online, 0.75)
  want = {"params": {"w": [[1.5, 1.5]], "b": [0.25]},
          "batch_stats": {"mean": [3.0, -3.0], "var": [1.25, 1.5]}}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b), new, want)
  moco = ema.momentum_update(target, online, ema.MOCO_MOMENTUM_CIFAR)
  np.testing.assert_allclose(np.asarray(moco["params"]["w"]), [[1.02, 1.98]], rtol=1e-6)
  # decay 1 keeps the target, decay 0 copies the online network.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b),
                         ema.ema_update(target, online, 1.0), target)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b),
                         ema.ema_update(target, online, 0.0), online)
  with pytest.raises(TypeError, match="floating"):
    ema.ema_update({"n": jnp.array(1)}, {"n": jnp.array(2)}, 0.5)


# ---- SimSiam / BYOL --------------------------------------------------------------------------

def _np_cos(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_negative_cosine_and_byol_match_numpy():
  rng = np.random.default_rng(10)
  p1, p2, z1, z2 = (rng.normal(size=(6, 5)) for _ in range(4))
  d12 = -np.mean([_np_cos(p1[i], z2[i]) for i in range(6)])
  d21 = -np.mean([_np_cos(p2[i], z1[i]) for i in range(6)])
  np.testing.assert_allclose(_jax64(jax.jit(negative_cosine), p1, z2), d12, rtol=1e-12)
  np.testing.assert_allclose(_jax64(jax.jit(symmetric_negative_cosine), p1, p2, z1, z2),
                             (d12 + d21) / 2, rtol=1e-12)
  want = np.mean([np.sum((p1[i] / np.linalg.norm(p1[i]) - z2[i] / np.linalg.norm(z2[i])) ** 2)
                  for i in range(6)])
  np.testing.assert_allclose(_jax64(jax.jit(byol_loss), p1, z2), want, rtol=1e-12)


@pytest.mark.parametrize("loss", [negative_cosine, byol_loss])
def test_cosine_losses_stop_gradient_of_target(loss):
  rng = np.random.default_rng(11)
  p = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  gp, gz = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, z)
  assert (np.asarray(gz) == 0).all()
  assert np.abs(np.asarray(gp)).max() > 1e-3


# ---- Barlow Twins ----------------------------------------------------------------------------

def _np_barlow(z1, z2, lam, eps=1e-5):
  """Zbontar et al. 2021, Eq. 1 on batch-standardised embeddings (biased variance, eps)."""
  n, d = z1.shape

  def standardise(z):
    mean = [sum(z[b, i] for b in range(n)) / n for i in range(d)]
    var = [sum((z[b, i] - mean[i]) ** 2 for b in range(n)) / n for i in range(d)]
    return np.array([[(z[b, i] - mean[i]) / math.sqrt(var[i] + eps) for i in range(d)]
                     for b in range(n)])

  a, b = standardise(z1), standardise(z2)
  loss = 0.0
  for i in range(d):
    for j in range(d):
      c = sum(a[r, i] * b[r, j] for r in range(n)) / n
      loss += (1 - c) ** 2 if i == j else lam * c ** 2
  return loss


_barlow = jax.jit(barlow_twins, static_argnames=("axis_name",))


def test_barlow_twins_matches_numpy():
  rng = np.random.default_rng(12)
  z1 = rng.normal(size=(8, 5)) * 2.0 + 1.0
  z2 = z1 + 0.5 * rng.normal(size=(8, 5))
  for lam in (0.0051, 0.5):
    np.testing.assert_allclose(_jax64(_barlow, z1, z2, lambda_offdiag=lam),
                               _np_barlow(z1, z2, lam), rtol=1e-10)
  # Identical views with zero-mean, orthogonal columns: C = I / (1 + eps), the loss ~ 0.
  a = rng.normal(size=(8, 4))
  q, _ = np.linalg.qr(a - a.mean(axis=0))
  z = q * np.sqrt(8)
  np.testing.assert_allclose(_jax64(_barlow, z, z), 4 * (1e-5 / (1 + 1e-5)) ** 2,
                             rtol=1e-6)


def test_barlow_twins_pmap_matches_single_device():
  """4 devices: every device returns the single-device value; pmean'd gradient equals it too."""
  _needs_devices()
  rng = np.random.default_rng(13)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  x1 = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  x2 = x1 + 0.3 * jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)

  def loss(w, a, b, axis_name=None):
    return barlow_twins(a @ w, b @ w, 0.0051, axis_name)

  value, grad = jax.jit(jax.value_and_grad(loss))(w, x1, x2)
  np.testing.assert_allclose(
      float(value), _np_barlow(np.asarray(x1 @ w, np.float64), np.asarray(x2 @ w, np.float64),
                               0.0051), rtol=1e-5)

  def per_device(w, a, b, axis_name):
    v, g = jax.value_and_grad(loss)(w, a, b, axis_name)
    return v, parallel.pmean(g)

  run = jax.pmap(functools.partial(per_device, axis_name=parallel.AXIS),
                 axis_name=parallel.AXIS, in_axes=(None, 0, 0), devices=jax.devices()[:N_DEV])
  pv, pg = run(w, _shard(x1), _shard(x2))
  np.testing.assert_allclose(np.asarray(pv), np.full(N_DEV, float(value)), rtol=1e-5)
  for d in range(N_DEV):
    np.testing.assert_allclose(np.asarray(pg[d]), np.asarray(grad), rtol=1e-4, atol=1e-5)
  # Local statistics only (no axis): a different loss, so the gather is what makes it equal.
  local = jax.pmap(functools.partial(per_device, axis_name=None), axis_name=parallel.AXIS,
                   in_axes=(None, 0, 0), devices=jax.devices()[:N_DEV])
  lv, _ = local(w, _shard(x1), _shard(x2))
  assert abs(float(lv[0]) - float(value)) > 1e-2
