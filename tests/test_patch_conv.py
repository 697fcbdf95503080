"""models/patch_conv.py: the same function as lax.conv_general_dilated, to every order of
differentiation and under vmap, with the kernel derivative computed as patch GEMMs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metaug_jax.models import encoders, patch_conv

# (batch, side, channels in, kernel, stride, pads, channels out): AlexNet-half's conv1 shape
# class (stride 4, kernel not a multiple of it), a stride that divides the kernel, asymmetric
# pads, stride 1, an odd batch (chunks of 1) and a kernel wider than the padded image allows.
CASES = [
    (4, 23, 3, 11, 4, ((2, 2), (2, 2)), 5),
    (2, 12, 2, 4, 2, ((0, 0), (0, 0)), 3),
    (3, 9, 1, 3, 2, ((1, 0), (0, 2)), 4),
    (2, 7, 3, 3, 1, ((1, 1), (1, 1)), 2),
    (5, 10, 2, 5, 3, ((0, 1), (2, 0)), 3),
]


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _lax(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _inputs(case):
  n, side, cin, k, s, pads, cout = case
  kx, kw, kt = jax.random.split(jax.random.PRNGKey(sum(map(hash, (n, side, cin, k, s)))), 3)
  x = jax.random.normal(kx, (n, side, side, cin), jnp.float64)
  w = jax.random.normal(kw, (k, k, cin, cout), jnp.float64)
  return x, w, (s, s), pads, jax.random.normal(kt, w.shape, jnp.float64)


def _close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_patch_conv_equals_lax_conv_to_second_order(x64, case):
  x, w, strides, pads, tangent = _inputs(case)
  ref = functools.partial(_lax, strides=strides, pads=pads)
  new = functools.partial(patch_conv.conv, strides=strides, pads=pads, chunk=2)
  loss = lambda conv_fn: lambda x, w: jnp.sum(jnp.tanh(conv_fn(x, w)) ** 2)
  checks = {
      "value": lambda f: f(x, w),
      "patch_gemm_conv": lambda f: f(x, w) if f is ref else patch_conv.patch_gemm_conv(
          x, w, strides, pads, ref(x, w).shape[1:3], chunk=2),
      "grad": lambda f: jax.grad(loss(f), (0, 1))(x, w),
      "jvp": lambda f: jax.jvp(f, (x, w), (x * 0.5, tangent)),
      "linearize_transpose": lambda f: jax.linear_transpose(
          jax.linearize(lambda w: loss(f)(x, w), w)[1], w)(1.0),
      "grad_of_grad": lambda f: jax.grad(
          lambda w: jnp.sum(jax.grad(loss(f), 1)(x, w) ** 3), (0,))(w),
      "input_grad_of_kernel_grad": lambda f: jax.grad(
          lambda x: jnp.sum(jax.grad(loss(f), 1)(x, w) ** 2))(x),
      "hvp": lambda f: jax.jvp(jax.grad(loss(f), 1), (x, w), (x, tangent))[1],
      "vmap_grad": lambda f: jax.vmap(jax.grad(loss(f), 1), (None, 0))(
          x, jnp.stack([w, 2.0 * w])),
      "jit_grad": lambda f: jax.jit(jax.grad(loss(f), 1))(x, w),
  }
  for name, check in checks.items():
    try:
      _close(check(new), check(ref))
    except AssertionError as err:
      raise AssertionError(f"{name}: {err}") from None


def test_space_to_depth_kernel_and_patches_form_the_conv(x64):
  """One GEMM of the patches with the rearranged kernel is the strided conv (the identity the
  weight derivative relies on), including the zero taps past k in the last block."""
  x, w, strides, pads, _ = _inputs(CASES[0])
  out_hw = _lax(x, w, strides, pads).shape[1:3]
  patches = patch_conv.space_to_depth_patches(x, w.shape[:2], strides, pads, out_hw)
  matrix = patch_conv.space_to_depth_kernel(w, strides)
  assert patches.shape[-1] == matrix.shape[0] == 3 * 3 * 4 * 4 * 3
  _close(jnp.einsum("nijk,ko->nijo", patches, matrix), _lax(x, w, strides, pads))


def test_flax_conv_with_patches_has_the_same_params_and_gradients():
  """An encoder's conv built with weight_grad='patches' has the XLA conv's parameter tree and
  gives the same loss gradient (float32), so checkpoints move freely between the two."""
  cfg = ml_collections.ConfigDict({"encoder": "alexnet_half", "embedding_dim": 16,
                                   "width": 0.125, "dtype": "float32"})
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 224, 224, 3))
  grads, trees = {}, {}
  for choice in ("xla", "patches"):
    cfg.conv1_weight_grad = choice
    model = encoders.build_encoder(cfg)
    assert model.conv1_weight_grad == choice
    variables = model.init(jax.random.PRNGKey(1), x, train=True)
    trees[choice] = jax.tree.map(jnp.shape, variables)

    def loss(params, variables=variables, model=model):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out["embedding"][:, 0]) + jnp.sum(out["fc"] ** 2) * 1e-3

    grads[choice] = jax.jit(jax.grad(loss))(variables["params"])
  assert trees["xla"] == trees["patches"]
  for path, a in jax.tree_util.tree_leaves_with_path(grads["xla"]):
    b = functools.reduce(lambda t, k: t[k.key], path, grads["patches"])
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4,
                               atol=2e-4 * float(jnp.abs(a).max()) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_auto_uses_patches_only_for_alexnet_half_on_cpu_with_ynnpack_convolutions():
  auto = lambda encoder, backend, eigen: encoders.conv1_weight_grad(
      encoder, "auto", backend=backend, eigen_convolutions=eigen)
  assert auto("alexnet_half", "cpu", eigen=False) == "patches"
  assert auto("alexnet_half", "cpu", eigen=True) == "xla"
  assert auto("alexnet_half", "gpu", eigen=False) == "xla"
  assert auto("resnet18", "cpu", eigen=False) == "xla"
  assert encoders.conv1_weight_grad("resnet18", "patches", backend="gpu") == "patches"
  with pytest.raises(ValueError, match="conv1_weight_grad"):
    encoders.conv1_weight_grad("alexnet_half", "fast")
