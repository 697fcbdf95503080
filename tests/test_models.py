"""Encoders, MAG and layer helpers: shapes (docs/metaug.md §3.1, §3.2, §12.4), SyncBN under
pmap, remat."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest

from metaug_jax.models.encoders import (AlexNetHalf, AlexNetSmall, DigitsConvNet,
                                        MultiViewEncoder, ResNet18, build_encoder)
from metaug_jax.models.layers import l2_normalize, max_pool
from metaug_jax.models.mag import MAG, MultiViewMAG, build_multiview_mag

KEY = jax.random.PRNGKey(0)


def _images(b, s, c, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, s, s, c), jnp.float32)


def _num_params(variables):
  return sum(p.size for p in jax.tree.leaves(variables["params"]))


def _assert_unit_norm(z):
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, rtol=1e-5)


def _model_config(**kw):
  c = ml_collections.ConfigDict(dict(encoder="digits_conv", embedding_dim=32, width=0.25,
                                     dtype="float32", mag_hidden=64))
  c.update(kw)
  return c


def test_alexnet_half_spec_shapes_and_size():
  """conv5 6x6x128 (4608), fc6 2048, ~14.85M parameters per 3-channel view (docs/metaug.md
  §3.1, §12.4)."""
  model = AlexNetHalf()
  out, variables = model.init_with_output(KEY, _images(2, 224, 3), train=False)
  assert out["conv"].shape == (2, 4608)
  assert out["fc"].shape == (2, 2048)
  assert out["embedding"].shape == (2, 128)
  assert variables["params"]["fc6"]["kernel"].shape == (4608, 2048)
  assert variables["params"]["conv1"]["conv"]["kernel"].shape == (11, 11, 3, 48)
  assert "bias" not in variables["params"]["conv1"]["conv"]
  assert abs(_num_params(variables) - 14.85e6) / 14.85e6 < 0.01
  _assert_unit_norm(out["embedding"])
  p = np.asarray(out["projection"])  # the embedding before its L2 normalisation
  np.testing.assert_allclose(np.asarray(out["embedding"]),
                             p / np.linalg.norm(p, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
  assert (np.asarray(out["fc"]) >= 0).all()  # after ReLU


def test_alexnet_half_rejects_other_sizes():
  with pytest.raises(ValueError, match="224"):
    AlexNetHalf().init(KEY, _images(2, 32, 3), train=False)


@pytest.mark.parametrize("model,size,channels,conv_dim,fc_dim", [
    (AlexNetSmall(), 32, 3, 2048, 1024),
    (AlexNetSmall(width=0.25), 64, 2, 512, 256),
    (AlexNetSmall(width=0.25), 96, 1, 512, 256),
    (ResNet18(), 32, 3, 512, 2048),
    (DigitsConvNet(), 16, 1, 1024, 256),
    (DigitsConvNet(embedding_dim=64, width=0.5), 16, 3, 512, 128),
])
def test_encoder_output_shapes(model, size, channels, conv_dim, fc_dim):
  # Shapes by abstract evaluation (cheap); values are checked on the digits net below.
  out, _ = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False),
                          _images(2, size, channels))
  assert set(out) == {"conv", "fc", "projection", "embedding"}
  assert out["conv"].shape == (2, conv_dim)
  assert out["fc"].shape == (2, fc_dim)
  assert out["embedding"].shape == out["projection"].shape == (2, model.embedding_dim)
  assert all(a.dtype == jnp.float32 for a in out.values())


def test_encoder_embeddings_unit_norm():
  # The L2 head is shared by all encoders (AlexNetHalf is also run above).
  out, _ = DigitsConvNet().init_with_output(KEY, _images(2, 16, 3), train=True)
  _assert_unit_norm(out["embedding"])
  p = np.asarray(out["projection"])  # the embedding before its L2 normalisation
  np.testing.assert_allclose(np.asarray(out["embedding"]),
                             p / np.linalg.norm(p, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
  assert (np.asarray(out["fc"]) >= 0).all()
  assert np.isfinite(np.asarray(out["conv"])).all()


def test_alexnet_small_rejects_non_multiple_of_32():
  with pytest.raises(ValueError, match="multiple of 32"):
    AlexNetSmall().init(KEY, _images(2, 48, 3), train=False)


def test_build_encoder_dispatch_and_dtype():
  for name, cls in [("digits_conv", DigitsConvNet), ("alexnet_small", AlexNetSmall),
                    ("alexnet_half", AlexNetHalf), ("resnet18", ResNet18)]:
    enc = build_encoder(_model_config(encoder=name, remat=True), axis_name="batch")
    assert isinstance(enc, cls) and enc.remat and enc.axis_name == "batch"
    assert enc.embedding_dim == 32 and enc.width == 0.25
  with pytest.raises(ValueError, match="digits_conv, alexnet_small, alexnet_half, resnet18"):
    build_encoder(_model_config(encoder="vgg"))
  with pytest.raises(ValueError, match="dtype"):
    build_encoder(_model_config(dtype="float16"))
  enc = build_encoder(_model_config(dtype="bfloat16"))
  out, variables = enc.init_with_output(KEY, _images(2, 16, 1), train=True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert out["embedding"].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embedding"]), axis=-1), 1.0,
                             rtol=1e-3)


def test_pmap_train_mode_syncs_batch_norm():
  """1-device vs 4-device pmap outputs and BN running stats equal for the same global batch."""
  n_dev = 4
  if jax.local_device_count() < n_dev:
    pytest.skip("needs 4 devices (tests/conftest.py simulates them)")
  x = _images(8, 16, 1, seed=1) * 2.0 + jnp.arange(8.0)[:, None, None, None]
  variables = DigitsConvNet(width=0.25).init(KEY, x[:2], train=False)
  single, single_state = DigitsConvNet(width=0.25).apply(
      variables, x, train=True, mutable=["batch_stats"])

  def per_device(axis_name):
    model = DigitsConvNet(width=0.25, axis_name=axis_name)
    return jax.pmap(lambda v, xs: model.apply(v, xs, train=True, mutable=["batch_stats"]),
                    axis_name="batch", in_axes=(None, 0))

  out, state = per_device("batch")(variables, x.reshape((n_dev, 2) + x.shape[1:]))
  for k in single:
    np.testing.assert_allclose(np.asarray(out[k]).reshape(single[k].shape),
                               np.asarray(single[k]), rtol=1e-4, atol=1e-5)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(single_state)):
    for d in range(n_dev):
      np.testing.assert_allclose(np.asarray(got[d]), np.asarray(want), rtol=1e-4, atol=1e-6)
  # Control: per-device BN statistics (no axis_name) give different outputs.
  out_local, _ = per_device(None)(variables, x.reshape((n_dev, 2) + x.shape[1:]))
  diff = np.abs(np.asarray(out_local["embedding"]).reshape(8, -1)
                - np.asarray(single["embedding"])).max()
  assert diff > 1e-3


@pytest.mark.slow  # second-order gradients of the remat and plain encoders
def test_remat_matches_plain_and_is_twice_differentiable():
  x = _images(4, 8, 1, seed=2)
  plain, remat = DigitsConvNet(width=0.125), DigitsConvNet(width=0.125, remat=True)
  variables = plain.init(KEY, x, train=False)
  assert (jax.tree.structure(remat.init(KEY, x, train=False))
          == jax.tree.structure(variables))

  def loss(params, model):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return jnp.sum(out["embedding"][:, 0]) + jnp.sum(out["fc"] ** 2) * 1e-3

  g_plain = jax.grad(loss)(variables["params"], plain)
  g_remat = jax.grad(loss)(variables["params"], remat)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

  def grad_norm(params):  # a second-order quantity, as in the meta-gradient
    g = jax.grad(loss)(params, remat)
    return sum(jnp.sum(t ** 2) for t in jax.tree.leaves(g))

  gg = jax.jit(jax.grad(grad_norm))(variables["params"])
  assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(gg))


def test_multiview_encoder_per_view_channels():
  model = MultiViewEncoder(_model_config(), num_views=3)
  hash(model)  # usable as a jit static argument despite the (mutable) ConfigDict field
  views = [_images(2, 16, c, seed=c) for c in (1, 2, 3)]
  outs, variables = model.init_with_output(KEY, views, train=True)
  assert sorted(variables["params"]) == ["view_0", "view_1", "view_2"]
  for i, c in enumerate((1, 2, 3)):
    assert variables["params"][f"view_{i}"]["conv1"]["conv"]["kernel"].shape[2] == c
  assert len(outs) == 3
  for o in outs:
    assert o["embedding"].shape == (2, 32)
    _assert_unit_norm(o["embedding"])
  with pytest.raises(ValueError, match="3 views"):
    model.init(KEY, views[:2], train=True)


def test_multiview_encoder_shared():
  model = MultiViewEncoder(_model_config(), num_views=2, share=True)
  views = [_images(3, 16, 1, seed=5), _images(3, 16, 1, seed=6)]
  outs, variables = model.init_with_output(KEY, views, train=False)
  assert list(variables["params"]) == ["view_0"]
  single = DigitsConvNet(embedding_dim=32, width=0.25).apply(
      {"params": variables["params"]["view_0"],
       "batch_stats": variables["batch_stats"]["view_0"]}, views[1], train=False)
  np.testing.assert_allclose(np.asarray(outs[1]["embedding"]), np.asarray(single["embedding"]),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="one shape"):
    model.init(KEY, [views[0], _images(3, 16, 2)], train=False)


def test_mag_shapes_and_unit_norm():
  """docs/metaug.md §3.2, §12.4: 128 -> 2048 -> 2048 -> 128, ~4.73M parameters."""
  z = l2_normalize(jax.random.normal(KEY, (4, 128)))
  out, variables = MAG().init_with_output(KEY, z, train=True)
  assert out["hidden"].shape == (4, 2048) and out["embedding"].shape == (4, 128)
  assert abs(_num_params(variables) - 4.73e6) / 4.73e6 < 0.01
  _assert_unit_norm(out["embedding"])

  mag = build_multiview_mag(_model_config(), num_views=2)
  zs = [l2_normalize(jax.random.normal(jax.random.PRNGKey(i), (3, 32))) for i in range(2)]
  outs, variables = mag.init_with_output(KEY, zs, train=True)
  assert isinstance(mag, MultiViewMAG)
  assert sorted(variables["params"]) == ["view_0", "view_1"]
  for o in outs:
    assert o["hidden"].shape == (3, 64) and o["embedding"].shape == (3, 32)
    _assert_unit_norm(o["embedding"])


def test_l2_normalize_value_and_second_order_at_zero():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(l2_normalize(x)), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)

  def f(x):
    return jnp.sum(l2_normalize(x) * jnp.array([1.0, 2.0]))

  g = jax.grad(f)(x)
  h = jax.hessian(f)(x)
  assert np.isfinite(np.asarray(g)).all() and np.isfinite(np.asarray(h)).all()
  # Away from zero: d(x/|x|)/dx . v = (v - u (u.v)) / |x| with u = x/|x|, v = (1, 2).
  u, v = np.array([0.6, 0.8]), np.array([1.0, 2.0])
  np.testing.assert_allclose(np.asarray(g[0]), (v - u * (u @ v)) / 5.0, rtol=1e-6)


@pytest.mark.parametrize("size,window,stride,padding", [
    (13, 3, 2, "VALID"), (12, 3, 2, "VALID"), (8, 3, 2, "SAME"), (9, 2, 2, 1)])
def test_max_pool_matches_flax_to_second_order(size, window, stride, padding):
  """Our pool = nn.max_pool in value, gradient (first maximum of each window takes it, ties
  from ReLU zeros included) and a second-order derivative like MetAug's meta-gradient."""
  x = jax.nn.relu(_images(2, size, 3, seed=1))          # many exact ties at 0
  x = x.at[0, :2, :2, 0].set(0.7)                       # a tie between positive values
  pads = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))

  def ours(x):
    return max_pool(x, window, stride, padding)

  def flax_pool(x):
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)

  weights = jax.random.normal(jax.random.PRNGKey(2), flax_pool(x).shape)
  np.testing.assert_array_equal(ours(x), flax_pool(x))
  for pool_fn_grads in [
      lambda f: jax.grad(lambda x: jnp.sum(f(x) * weights))(x),
      lambda f: jax.grad(lambda x: jnp.sum(jax.grad(
          lambda y: jnp.sum(f(y) ** 3 * weights))(x) * jnp.cos(x)))(x),
      lambda f: jax.jvp(lambda x: jax.grad(lambda y: jnp.sum(f(y) ** 2))(x), (x,),
                        (jnp.sin(x),))[1]]:
    np.testing.assert_allclose(pool_fn_grads(ours), pool_fn_grads(flax_pool), rtol=1e-6,
                               atol=1e-6)
