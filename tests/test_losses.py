"""Losses against direct NumPy formulas (docs/metaug.md §4.1, §4.3, §12.1-12.2) and
multi-device NT-Xent."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import feature_aug
from metaug_jax.losses import (adapters, margin_regularizer, margin_thresholds, nt_xent, oucl,
                               score_from_cosine)
from metaug_jax.models.layers import l2_normalize


def _scores(seed, b=5, p=6, n=11):
  rng = np.random.default_rng(seed)
  return rng.uniform(0.0, 1.0, (b, p)), rng.uniform(0.0, 1.0, (b, n))


def _np_oucl(pos, neg, form, beta, gamma_pos=0.0, gamma_neg=0.0, margin=0.25,
             adaptive=False, scale="code"):
  """The paper's forms as explicit double sums over the P x N pairs (docs/metaug.md §4.1)."""
  out = []
  for p, n in zip(pos, neg):
    if form == 1:
      out.append(max(n.sum() - p.sum() + margin, 0.0))
      continue
    total = 0.0
    for pk in p:
      for nj in n:
        if form == 2:
          total += np.exp(beta * ((pk - 1.0) ** 2 + nj ** 2 - 2.0 * margin ** 2))
        else:
          if adaptive:
            wp, wn, gp, gn = max(1 + margin - pk, 0.0), max(nj + margin, 0.0), 1 - margin, margin
          else:
            wp, wn, gp, gn = 1.0, 1.0, gamma_pos, gamma_neg
          total += np.exp(beta * (wn * (nj - gn) - wp * (pk - gp)))
    c = (16.0 if scale == "code" else 1.0) / beta
    out.append(c * np.log1p(total))
  return np.array(out)


@pytest.mark.parametrize("kwargs", [
    dict(form=3, beta=16.0),
    dict(form=3, beta=16.0, scale="paper"),
    dict(form=3, beta=5.0, gamma_pos=0.75, gamma_neg=0.25),
    dict(form=3, beta=8.0, adaptive=True, margin=0.25),
    dict(form=3, beta=8.0, adaptive=True, margin=0.4, scale="paper"),
    dict(form=2, beta=16.0, margin=0.25),
    dict(form=2, beta=3.0, margin=0.1, scale="paper"),
    dict(form=1, beta=16.0, margin=0.25),
    dict(form=1, beta=16.0, margin=3.0),
])
def test_oucl_matches_double_sum(kwargs):
  pos, neg = _scores(0)
  with jax.enable_x64(True):
    got = np.asarray(oucl(jnp.asarray(pos), jnp.asarray(neg), **kwargs))
    assert got.dtype == np.float64
  want = _np_oucl(pos, neg, **kwargs)
  assert got.shape == (pos.shape[0],)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  if kwargs["form"] == 1 and kwargs["margin"] == 3.0:
    assert (want > 0).all()  # the hinge is active in this case


def test_oucl_code_default_equals_spec_identity():
  """Code default = log(1 + sum_k sum_j exp(16 (n_j - p_k))), in float32 too (docs/metaug.md
  §12.1)."""
  pos, neg = _scores(1, b=4, p=6, n=64)
  got = oucl(jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32))
  want = np.log1p(np.exp(16.0 * (neg[:, None, :] - pos[:, :, None])).sum(axis=(1, 2)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def _stable_pair_lse(pos, neg, form, beta, margin=0.25, **_):
  """log(1 + sum exp(pair)) over the explicit pair matrix with the max trick (any beta)."""
  if form == 2:
    pair = beta * ((pos[:, :, None] - 1) ** 2 + neg[:, None, :] ** 2 - 2 * margin ** 2)
  else:
    pair = beta * (neg[:, None, :] - pos[:, :, None])
  pair = pair.reshape(pair.shape[0], -1)
  pair = np.concatenate([np.zeros((pair.shape[0], 1)), pair], axis=1)  # the "1 +"
  m = pair.max(axis=1, keepdims=True)
  return (16.0 / beta) * (m[:, 0] + np.log(np.exp(pair - m).sum(axis=1)))


@pytest.mark.parametrize("kwargs", [
    dict(form=3, beta=1e3),
    dict(form=3, beta=1e3, adaptive=True),
    dict(form=3, beta=1e3, gamma_pos=0.75, gamma_neg=0.25),
    dict(form=2, beta=1e3),
    dict(form=1, beta=1e3),
    dict(form=3, beta=16.0),
])
def test_oucl_finite_at_extremes(kwargs):
  """Values, gradients and second derivatives finite at scores exactly 0 and 1, large beta."""
  pos = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 1.0, 0.0]])
  neg = jnp.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])

  def total(p, n):
    return jnp.sum(oucl(p, n, **kwargs))

  value = oucl(pos, neg, **kwargs)
  grads = jax.grad(total, argnums=(0, 1))(pos, neg)
  hess = jax.grad(lambda p, n: sum(jnp.sum(g ** 2) for g in jax.grad(total, (0, 1))(p, n)),
                  argnums=(0, 1))(pos, neg)
  for a in (value, *grads, *hess):
    assert np.isfinite(np.asarray(a)).all()
  if kwargs["form"] != 1 and not kwargs.get("adaptive") and "gamma_pos" not in kwargs:
    want = _stable_pair_lse(np.asarray(pos, np.float64), np.asarray(neg, np.float64), **kwargs)
    np.testing.assert_allclose(np.asarray(value), want, rtol=1e-5)


def test_oucl_adaptive_weights_carry_no_gradient():
  """Circle weights G+- are stop-gradient: grad equals the frozen-weight NumPy derivative."""
  pos, neg = _scores(2, b=3, p=4, n=7)
  beta, m = 8.0, 0.25
  with jax.enable_x64(True):
    gp, gn = jax.grad(lambda p, n: jnp.sum(oucl(p, n, beta=beta, adaptive=True, margin=m)),
                      argnums=(0, 1))(jnp.asarray(pos), jnp.asarray(neg))
  c = 16.0 / beta
  wp = np.maximum(1 + m - pos, 0.0)
  wn = np.maximum(neg + m, 0.0)
  e = np.exp(beta * (wn[:, None, :] * (neg[:, None, :] - m)
                     - wp[:, :, None] * (pos[:, :, None] - (1 - m))))  # (B, P, N)
  s = e.sum(axis=(1, 2))
  want_p = c / (1 + s)[:, None] * e.sum(axis=2) * (-beta * wp)
  want_n = c / (1 + s)[:, None] * e.sum(axis=1) * (beta * wn)
  np.testing.assert_allclose(np.asarray(gp), want_p, rtol=1e-10)
  np.testing.assert_allclose(np.asarray(gn), want_n, rtol=1e-10)
  # The weights' own derivative is not small here, so the check discriminates.
  full_p = want_p + c / (1 + s)[:, None] * (e * beta * (pos[:, :, None] - (1 - m))).sum(axis=2)
  assert np.abs(full_p - want_p).max() > 1e-3


def test_oucl_rejects_bad_options():
  pos, neg = jnp.ones((2, 3)), jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="form"):
    oucl(pos, neg, form=4)
  with pytest.raises(ValueError, match="scale"):
    oucl(pos, neg, scale="torch")


# ---- margin-injected regulariser (docs/metaug.md §4.3, §12.2) ------------------------------

# Row 0 overlaps (min positive 0.4 <= max negative 0.6); row 1 is separated (0.8 > 0.3).
_ORIG_POS = jnp.array([[0.9, 0.4, 0.7], [0.95, 0.8, 0.85]])
_ORIG_NEG = jnp.array([[0.2, 0.6, 0.1], [0.3, 0.1, 0.2]])


@pytest.mark.parametrize("margin_type,want_pos,want_neg", [
    ("large", [0.4, 0.3], [0.6, 0.8]),
    ("small", [0.6, 0.8], [0.4, 0.3]),
    ("medium", [0.5, 0.55], [0.5, 0.55]),
])
def test_margin_thresholds(margin_type, want_pos, want_neg):
  sigma_pos, sigma_neg = margin_thresholds(_ORIG_POS, _ORIG_NEG, margin_type)
  np.testing.assert_allclose(np.asarray(sigma_pos), want_pos, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sigma_neg), want_neg, rtol=1e-6)


def test_margin_thresholds_rejects_unknown():
  with pytest.raises(ValueError, match="margin_type"):
    margin_thresholds(_ORIG_POS, _ORIG_NEG, "mean")


def test_margin_regularizer_hand_computed():
  aug_pos = jnp.array([[0.7, 0.4], [0.2, 0.5]])
  aug_neg = jnp.array([[0.5, 0.7, 0.3], [0.9, 0.6, 0.8]])
  sigma_pos = jnp.array([0.5, 0.3])
  sigma_neg = jnp.array([0.6, 0.8])
  # positives: [0.2, 0] and [0, 0.2] -> mean 0.1; negatives: [0.1, 0, 0.3], [0, 0.2, 0] -> 0.1.
  got = margin_regularizer(aug_pos, aug_neg, sigma_pos, sigma_neg)
  np.testing.assert_allclose(float(got), 0.2, rtol=1e-6)
  got = margin_regularizer(aug_pos, aug_neg, sigma_pos, sigma_neg, pos_scale=1e-4)
  np.testing.assert_allclose(float(got), 0.1 + 1e-5, rtol=1e-6)


def test_margin_thresholds_not_detached():
  """docs/metaug.md §4.3: gradients flow into the original scores through min / max."""
  def r(orig_pos):
    sp, sn = margin_thresholds(orig_pos, _ORIG_NEG, "large")
    return margin_regularizer(jnp.full((2, 2), 0.9), jnp.full((2, 3), 0.1), sp, sn)
  g = np.asarray(jax.grad(r)(_ORIG_POS))
  # Row 0: sigma+ = p_min = 0.4 (index 1) is active in the positive hinge.
  assert g[0, 1] < 0 and np.count_nonzero(g[0]) == 1


# ---- NT-Xent and bank InfoNCE ---------------------------------------------------------------

def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_nt_xent(z1, z2, t):
  z = np.concatenate([z1, z2])
  n = z1.shape[0]
  losses = []
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    logits = np.array([z[i] @ z[j] / t for j in range(2 * n) if j != i])
    others = [j for j in range(2 * n) if j != i]
    losses.append(np.log(np.exp(logits).sum()) - logits[others.index(pos)])
  return np.mean(losses)


def test_nt_xent_matches_numpy():
  rng = np.random.default_rng(3)
  z1, z2 = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
  with jax.enable_x64(True):
    got = float(nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.3))
  np.testing.assert_allclose(got, _np_nt_xent(z1, z2, 0.3), rtol=1e-10)


def _linear_loss(w, x1, x2, axis_name=None):
  return nt_xent(l2_normalize(x1 @ w), l2_normalize(x2 @ w), 0.5, axis_name)


def test_nt_xent_pmap_matches_single_device():
  """pmean of per-device values and of per-device gradients = the 1-device ones (habit: gathered
  negatives with offset positives; lightly #1176/#2035 bugs)."""
  n_dev = 4
  if jax.local_device_count() < n_dev:
    pytest.skip("needs 4 devices (tests/conftest.py simulates them)")
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  x1 = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  x2 = jnp.asarray(x1 + 0.3 * rng.normal(size=(8, 6)), jnp.float32)
  value, grad = jax.value_and_grad(_linear_loss)(w, x1, x2)

  def shard(a):
    return a.reshape((n_dev, -1) + a.shape[1:])

  def per_device(w, a, b, gather):
    v, g = jax.value_and_grad(_linear_loss)(w, a, b, "d" if gather else None)
    return jax.lax.pmean(v, "d"), jax.lax.pmean(g, "d")

  run = jax.pmap(functools.partial(per_device, gather=True), axis_name="d",
                 in_axes=(None, 0, 0))
  pv, pg = run(w, shard(x1), shard(x2))
  np.testing.assert_allclose(np.asarray(pv), float(value), rtol=1e-5)
  for d in range(n_dev):
    np.testing.assert_allclose(np.asarray(pg[d]), np.asarray(grad), rtol=1e-4, atol=1e-6)
  # Without gathering, each device only sees local negatives: the value differs.
  local = jax.pmap(functools.partial(per_device, gather=False), axis_name="d",
                   in_axes=(None, 0, 0))
  lv, _ = local(w, shard(x1), shard(x2))
  assert abs(float(lv[0]) - float(value)) > 1e-3


def test_bank_infonce_adapter_matches_numpy():
  """CMC's loss: the infonce adapter on a bank direction (own row, K per-anchor rows)."""
  rng = np.random.default_rng(5)
  q = _unit(rng.normal(size=(4, 8)))
  rows = _unit(rng.normal(size=(4, 6, 8)))
  with jax.enable_x64(True):
    batch = feature_aug.ContrastBatch(anchor=jnp.asarray(q), positive=jnp.asarray(rows[:, :1]),
                                      negatives=jnp.asarray(rows[:, 1:]))
    got, (pos, neg) = adapters.infonce(batch, 0.07)
    got = np.asarray(got)
  want_scores = np.stack([[q[b] @ rows[b, k] for k in range(6)] for b in range(4)])
  np.testing.assert_allclose(np.concatenate([np.asarray(pos)[:, None], np.asarray(neg)], 1),
                             want_scores, rtol=1e-12)
  logits = want_scores / 0.07
  want = -np.log(np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1))
  assert got.shape == (4,)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_score_from_cosine():
  np.testing.assert_allclose(np.asarray(score_from_cosine(jnp.array([-1.0, 0.0, 1.0]))),
                             [0.0, 0.5, 1.0])
