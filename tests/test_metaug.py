"""MetAug's meta step: the second-order MAG gradient against finite differences (float64),
the first-order ablation, and banks untouched by augmented features."""

import os
import sys

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import meta_gradient, parallel
from metaug_jax.methods import DataFacts, metaug
from metaug_jax.methods.metaug import MetAug
from metaug_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402

BATCH = 8


def make_method(dtype="float32", **overrides):
  c = digits.get_config("tiny")
  c.method = "metaug"
  c.model.dtype = dtype
  c.model.width = 0.25
  c.model.embedding_dim = 8
  c.model.mag_hidden = 16
  c.batch_size = BATCH
  c.bank.num_negatives = 8
  c.metaug.lambda_aug = 1.0      # large weights and inner step: a clearly visible 2nd order
  c.metaug.lambda_mi = 1.0
  c.metaug.inner_lr = 0.5
  c.update_from_flattened_dict(overrides)
  facts = DataFacts(view_channels=(1, 1), bank_size=32, steps_per_epoch=1, global_batch=BATCH)
  return MetAug(c, facts)


def init(method, dtype):
  rng = np.random.default_rng(0)
  views = tuple(jnp.asarray(rng.normal(size=(BATCH, 16, 16, 1)), dtype) for _ in range(2))
  state = method.init(jax.random.PRNGKey(0), views)
  cast = lambda t: jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                else a, t)
  state = state.replace(params=cast(state.params), batch_stats=cast(state.batch_stats),
                        banks=cast(state.banks))
  return state, views


def _inputs(method, state, views, index):
  """StepInputs with fixed views and fixed negatives (key 7) for every phase."""
  keys = dict(zip(meta_gradient.PHASES, jax.random.split(jax.random.PRNGKey(7),
                                                          len(meta_gradient.PHASES))))
  return metaug.StepInputs(
      views=views, global_index=parallel.gather_rows(index), step=state.step,
      indices=lambda phase: method.draw_call_indices(keys[phase], index),
      augmenter_keys=lambda phase: jax.random.split(keys[phase], method.num_calls))


def _one_device(fn):
  return jax.pmap(fn, axis_name=parallel.AXIS, in_axes=(None, None, 0, 0),
                  devices=jax.devices()[:1])


def meta_functions(method, state, views):
  """(F(omega_inner, omega_direct), its gradient) on one device, banks and negatives fixed:
  `meta_gradient.reverse_meta_objective` of the method's L_total."""
  index = jnp.arange(BATCH, dtype=jnp.int32)

  def outer(omega_inner, omega_direct, views, index):
    objective = method.objective(state, _inputs(method, state, views, index))
    f = meta_gradient.reverse_meta_objective(objective, state.params["encoder"], state.banks,
                                             method.config.metaug.inner_lr)
    return f(omega_inner, omega_direct)[0]

  mapped = (tuple(v[None] for v in views), index[None])
  value = _one_device(outer)
  grad = _one_device(jax.grad(outer, argnums=(0, 1)))
  first = lambda x: jax.tree.map(lambda a: a[0], x)
  return (lambda a, b: float(value(a, b, *mapped)[0]),
          lambda a, b: first(grad(a, b, *mapped)))


def first_order_parts(method, state, views):
  """(second, direct) of `meta_gradient.first_order`, the virtual step along the same inner
  gradient that `meta_functions` differentiates through."""
  index = jnp.arange(BATCH, dtype=jnp.int32)
  theta, omega = state.params["encoder"], state.params["mag"]
  alpha = method.config.metaug.inner_lr

  def parts(omega, unused, views, index):
    del unused
    objective = method.objective(state, _inputs(method, state, views, index))
    inner = meta_gradient.linearize(objective, theta, omega, state.banks, "inner",
                                    update_stats=False)
    result = meta_gradient.first_order(objective, theta, inner.grad, omega, inner.banks,
                                       alpha)
    return result.second, result.direct

  out = _one_device(parts)(omega, 0, tuple(v[None] for v in views), index[None])
  return jax.tree.map(lambda a: a[0], out)


def _dot(a, b):
  return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(alpha, x, y):
  return jax.tree.map(lambda u, v: v + alpha * u, x, y)


@pytest.fixture
def x64(monkeypatch):
  """float64, and smooth stand-ins for ReLU / max-pool: finite differences across a kink of
  a BatchNorm+ReLU network (many pre-activations sit near 0) are noise, not a gradient check."""
  monkeypatch.setattr(flax.linen, "relu", lambda x: jax.nn.softplus(4.0 * x) / 4.0)
  monkeypatch.setattr(
      layers, "max_pool",
      lambda x, window, stride, padding="VALID": flax.linen.avg_pool(
          x, (window, window), strides=(stride, stride), padding=padding))
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_meta_gradient_matches_central_finite_differences(x64):
  # Detached margin thresholds (the default) make autodiff skip theta'(omega) -> sigma by
  # design, so the exact-derivative check uses the code's un-detached thresholds.
  method = make_method("float64", **{"metaug.margin_detach_thresholds": False})
  state, views = init(method, jnp.float64)
  value, grad = meta_functions(method, state, views)
  omega = state.params["mag"]
  second, direct = grad(omega, omega)
  rng = np.random.default_rng(1)
  eps = 1e-5
  for _ in range(2):
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float64), omega)
    plus, minus = _axpy(eps, v, omega), _axpy(-eps, v, omega)
    fd_total = (value(plus, plus) - value(minus, minus)) / (2 * eps)
    fd_second = (value(plus, omega) - value(minus, omega)) / (2 * eps)
    analytic_total = _dot(second, v) + _dot(direct, v)
    np.testing.assert_allclose(analytic_total, fd_total, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(_dot(second, v), fd_second, rtol=2e-5, atol=1e-9)
    assert abs(fd_second) > 1e-6 * abs(fd_total) + 1e-12   # the second-order path is real


def test_first_order_variant_drops_exactly_the_second_order_path(x64):
  method = make_method("float64")
  state, views = init(method, jnp.float64)
  omega = state.params["mag"]
  second, direct = meta_functions(method, state, views)[1](omega, omega)
  second_fo, direct_fo = first_order_parts(method, state, views)
  norm = lambda t: float(jnp.sqrt(_dot(t, t)))
  assert norm(second_fo) == 0.0
  assert norm(second) > 1e-6 * norm(direct)
  for a, b in zip(jax.tree.leaves(direct_fo), jax.tree.leaves(direct)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  total = jax.tree.map(jnp.add, second, direct)
  assert norm(jax.tree.map(jnp.subtract, total, direct_fo)) > 1e-8


def _one_step(method, state, batch):
  """One pmapped train step on one device; returns the unreplicated (state, metrics)."""
  fn = jax.pmap(method.train_step, axis_name=parallel.AXIS, devices=jax.devices()[:1])
  new_state, metrics = fn(*jax.tree.map(lambda a: a[None], (state, batch)))
  return jax.tree.map(lambda a: a[0], (new_state, metrics))


@pytest.mark.parametrize("virtual_step_from", [
    "updated", pytest.param("current", marks=pytest.mark.slow)])  # each ~1 minute
def test_forward_over_reverse_equals_double_backward(x64, virtual_step_from):
  """metaug.meta_gradient="forward_over_reverse" (jvp of the omega-gradient) gives the same
  second-order MAG gradient as jax.grad-of-jax.grad, which the finite-difference test pins."""
  def method(**kw):
    return make_method("float64", **{"metaug.virtual_step_from": virtual_step_from}, **kw)

  state, _ = init(method(), jnp.float64)
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.integers(0, 256, size=(BATCH, 8, 8, 1)), jnp.uint8),
           "index": jnp.arange(BATCH, dtype=jnp.int32)}
  rev, m_rev = _one_step(method(**{"metaug.meta_gradient": "reverse"}), state, batch)
  fwd, m_fwd = _one_step(method(**{"metaug.meta_gradient": "forward_over_reverse"}), state,
                         batch)
  fo, _ = _one_step(method(**{"metaug.first_order": True}), state, batch)
  for name in ("mag_grad_second_order_norm", "mag_grad_direct_norm", "meta_loss",
               "loss_total"):
    np.testing.assert_allclose(m_fwd[name], m_rev[name], rtol=1e-9, err_msg=name)
  dist = lambda a, b: float(jnp.sqrt(_dot(jax.tree.map(jnp.subtract, a, b),
                                          jax.tree.map(jnp.subtract, a, b))))
  # The second-order part moves the MAG by lr * |second| (first step, no momentum yet);
  # the two modes agree on it to ~1e-9 of that.
  second_step = dist(rev.params["mag"], fo.params["mag"])
  assert second_step > 1e-3 * dist(rev.params["mag"], state.params["mag"])
  assert dist(fwd.params["mag"], rev.params["mag"]) < 1e-8 * second_step
  assert dist(fwd.params["encoder"], rev.params["encoder"]) == 0.0


@pytest.mark.parametrize("algorithm", ["paper", "legacy"])
def test_augmented_features_never_change_a_bank(algorithm):
  method = make_method(**{"metaug.algorithm": algorithm})
  state, _ = init(method, jnp.float32)
  images = np.random.default_rng(2).integers(0, 256, size=(1, BATCH, 8, 8, 1), dtype=np.uint8)
  batch = {"image": images, "index": np.arange(BATCH, dtype=np.int32)[None] + 5}
  step = parallel.pmap_step(method.train_step, jax.devices()[:1], donate=False)
  other_mag = jax.tree.map(lambda a: a * 1.7 + 0.01, state.params["mag"])
  other = state.replace(params={**state.params, "mag": other_mag})
  new_a, _ = step(state, batch)
  new_b, _ = step(other, batch)
  # The MAGs differ, so the augmented features differ; the banks must not.
  assert not np.allclose(jax.tree.leaves(new_a.params["mag"])[0],
                         jax.tree.leaves(new_b.params["mag"])[0])
  np.testing.assert_array_equal(np.asarray(new_a.banks), np.asarray(new_b.banks))
  changed = np.any(np.asarray(new_a.banks) != np.asarray(state.banks), axis=(0, 2))
  assert set(np.flatnonzero(changed)) == set(range(5, 5 + BATCH))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new_a.banks), axis=-1), 1.0, atol=1e-5)
