"""Hierarchical augmentation invariance: the add-one pipelines apply exactly their exit's ops
and record the jitter parameters, exit s runs no later stage, the loss is the sum of the
per-exit losses, the probe reads the last exit only, 4 devices train like one, and the config
variants carry each data set's recipe."""

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metaug_jax import methods, parallel
from metaug_jax.data import augment
from metaug_jax.data import hierarchical as H
from metaug_jax.methods import hierarchical as hai_method
from metaug_jax.models import multi_exit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_baselines import max_diff, run  # noqa: E402
import digits  # noqa: E402  (configs/digits.py, put on the path by test_baselines)

JITTER = (0.4, 0.4, 0.4, 0.1)


def spec(size=40, schedule="add_one", exits=(1, 2, 3, 4), **hai):
  h = hai_method.defaults()
  h.exits, h.schedule = exits, schedule
  h.update(hai)
  data = ml_collections.ConfigDict({"input_size": size, "crop_scale": (0.2, 1.0),
                                    "crop_ratio": (3 / 4, 4 / 3)})
  return H.pipeline_spec(h, data, 4)


def uniforms(fire=True, turns=0.3):
  """Fixed uniforms: every gate fires (0.0 < p) or none does (0.99)."""
  u = np.full(H.UNIFORMS, 0.0 if fire else 0.99, np.float32)
  u[:5] = (0.3, 0.6, 0.25, 0.7, 0.99)          # crop box (the flip bit is set by the gate)
  u[6:10] = (0.1, 0.8, 0.3, 0.9)               # jitter factors
  u[12] = 0.4                                  # blur sigma = 0.1 + 1.9 * 0.4
  u[15] = turns                                # quarter turns = floor(4 u)
  return jnp.asarray(u)


def by_hand(u, image, exit_, size, flip=False, rotate=False):
  """The released order with augment's single ops: crop, jitter, [blur], [grey], [flip]."""
  crop = augment.resized_crop_matrix_from_uniforms(
      u[:5].at[4].set(0.0 if flip else 1.0), image.shape[:2], size, (0.2, 1.0),
      (3 / 4, 4 / 3), flip=True)
  v = augment.axis_aligned_sample(image, crop, size)
  v = augment.color_jitter_from_uniforms(u[6:10], v, *JITTER)
  if exit_ >= 3:
    v = H.gaussian_blur(v, 0.1 + 1.9 * u[12], 5)
  if exit_ >= 2:
    v = augment.grayscale_rgb(v)
  if rotate:
    v = jnp.rot90(v, 1, axes=(0, 1))
  return augment.standardize(v)


@pytest.fixture(scope="module")
def rgb():
  return jnp.asarray(np.random.RandomState(0).uniform(size=(48, 48, 3)), jnp.float32)


def test_each_exit_applies_exactly_its_ops(rgb):
  s, u = spec(), uniforms()
  assert H.stage_ops(s, 1).blur_kernel == 5     # 40 // 20 * 2 + 1
  view = jax.jit(H.view_from_uniforms, static_argnums=(2, 3))
  for e in (1, 2, 3, 4):
    got, params = view(u, rgb, H.stage_ops(s, e), 40)
    want = by_hand(u, rgb, e, 40, flip=e == 4)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"exit {e}")
    np.testing.assert_allclose(params, H.jitter_factors(u[6:10], JITTER), rtol=1e-6)
  # The flip is a mirror of the unflipped view (every later op commutes with it).
  np.testing.assert_allclose(by_hand(u, rgb, 4, 40, flip=True),
                             by_hand(u, rgb, 4, 40)[:, ::-1], atol=1e-5)
  # "uniform": the shallowest exit gets the full pipeline; rotation as an extra op.
  got, _ = view(u, rgb, H.stage_ops(spec(schedule="uniform"), 1), 40)
  np.testing.assert_allclose(got, by_hand(u, rgb, 4, 40, flip=True), atol=1e-5)
  got, _ = view(u, rgb, H.stage_ops(spec(rotation_from=4), 4), 40)
  np.testing.assert_allclose(got, by_hand(u, rgb, 4, 40, flip=True, rotate=True), atol=1e-5)
  assert H.stage_ops(spec(rotation_from=4), 3).rotation_probability == 0.0


def test_strength_schedule_and_blur_switch():
  shallow = H.stage_ops(spec(schedule="strength"), 1)     # three levels above the last
  np.testing.assert_allclose(shallow.jitter, (0.34, 0.34, 0.34, 0.04))
  np.testing.assert_allclose([shallow.grey_probability, shallow.blur_probability,
                              shallow.flip_probability, shallow.crop_scale[0]],
                             [0.05, 0.35, 0.35, 0.5])
  deepest = H.stage_ops(spec(schedule="strength"), 4)
  assert deepest == H.stage_ops(spec(), 4)                  # the classical pipeline
  assert H.stage_ops(spec(size=32), 4).blur_probability == 0.0   # off at <= 32 px
  assert H.blur_kernel_size(224) == 23


def test_jitter_parameters_are_b_by_4_and_identity_when_skipped(rgb):
  images = (np.asarray(rgb[:16, :16]) * 255).astype(np.uint8)[None].repeat(6, 0)
  keys = jax.random.split(jax.random.PRNGKey(1), 6)
  for p, check in ((0.0, "identity"), (1.0, "jittered")):
    out = H.hierarchical_views_from_keys(keys, jnp.asarray(images),
                                         spec(16, exits=(2, 4), jitter_probability=p))
    assert len(out) == 2
    for v1, v2, a1, a2 in out:
      assert v1.shape == v2.shape == (6, 16, 16, 3) and a1.shape == a2.shape == (6, 4)
      a = np.concatenate([a1, a2])
      if check == "identity":
        np.testing.assert_array_equal(a, np.tile(H.IDENTITY_JITTER, (12, 1)))
      else:
        assert np.all((a[:, :3] >= 0.6) & (a[:, :3] <= 1.4)) and np.all(np.abs(a[:, 3]) <= 0.1)
        assert np.all(a[:, 0] != 1.0)


def test_grey_images_jitter_brightness_and_contrast_only():
  grey = jnp.asarray(np.random.RandomState(2).uniform(size=(16, 16, 1)), jnp.float32)
  u = uniforms()
  got, params = H.view_from_uniforms(u, grey, H.stage_ops(spec(16, flip_from=0), 4), 16)
  f = H.jitter_factors(u[6:10], JITTER)
  np.testing.assert_allclose(params, [f[0], f[1], 1.0, 0.0], rtol=1e-6)
  crop = augment.resized_crop_matrix_from_uniforms(u[:5], (16, 16), 16, (0.2, 1.0),
                                                   (3 / 4, 4 / 3))
  v = augment.axis_aligned_sample(grey, crop, 16)
  v = augment.adjust_contrast(augment.adjust_brightness(v, f[0]), f[1])
  np.testing.assert_allclose(got, augment.standardize(v), atol=1e-6)


def test_gaussian_blur_matches_numpy():
  x = np.random.RandomState(3).uniform(size=(9, 9, 2)).astype(np.float32)
  sigma, k = 0.8, 5
  w = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
  w /= w.sum()
  p = np.pad(x, ((2, 2), (2, 2), (0, 0)), mode="reflect")
  want = np.zeros_like(x)
  for i in range(5):
    for j in range(5):
      want += w[i] * w[j] * p[i:i + 9, j:j + 9]
  np.testing.assert_allclose(H.gaussian_blur(jnp.asarray(x), sigma, k), want, atol=1e-6)
  with pytest.raises(ValueError, match="odd"):
    H.gaussian_blur(jnp.asarray(x), sigma, 4)


@pytest.mark.parametrize("arch,stage_convs,stem", [("digits", (1, 1, 1, 1), 0),
                                                   ("resnet18", (4, 5, 5, 5), 1)])
def test_exit_s_runs_no_stage_beyond_s(arch, stage_convs, stem):
  m = multi_exit.MultiExitEncoder(arch=arch, width=0.125, depthwise="xla")   # convs counted
  x = jnp.ones((2, 16, 16, 3))
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, (1, 2, 3, 4),
                                         method=m.all_exits))
  variables = jax.tree.map(jnp.zeros_like, shapes)
  for e in (1, 2, 3, 4):
    jaxpr = str(jax.make_jaxpr(lambda x: m.apply(variables, x, e, False))(x))
    # Exit head: prep + gate SepConv (4) + one SepConv (4) per remaining stage + out conv.
    head = 0 if e == 4 else 1 + 4 + 4 * (4 - e) + 1
    assert jaxpr.count("conv_general_dilated") == stem + sum(stage_convs[:e]) + head, e
    out = jax.eval_shape(lambda x: m.apply(variables, x, e, False), x)
    assert out.shape == (2, multi_exit.feature_dim(arch, 0.125))
  only_two = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, (2,),
                                           method=m.all_exits))["params"]
  assert not any(k.startswith(("stage3", "stage4", "exit1", "exit3")) for k in only_two)


RECIPES = {  # (backbone, px, blur kernel, batch, epochs, lr, weight decay) per config file
    "cifar10": ("resnet18", 32, 0, 512, 800, 0.06, 5e-4),
    "stl10": ("resnet50", 224, 23, 256, 200, 0.05, 1e-4),
    "tiny_imagenet": ("resnet50", 224, 23, 256, 200, 0.05, 1e-4),
    "fashion_mnist": ("digits", 28, 0, 256, 20, 0.03, 1e-4),
    "digits": ("digits", 16, 0, 128, 40, 0.03, 1e-4),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_config_variants_have_the_recipe_and_validate(name):
  """configs/NAME.py:METHOD for the three methods: the recipe of the data set, four exits,
  and a config that config_check accepts (nothing trains)."""
  from metaug_jax import config_check
  module = importlib.import_module(name)
  for method in ("simsiam_hai", "byol_hai", "barlow_hai"):
    c = module.get_config(method)
    c.data_dir = "/data"                            # tiny_imagenet reads local files
    config_check.validate(c, 4)
    s = H.pipeline_spec(c.hai, c.data, 4)
    got = (hai_method.backbone_arch(c), c.data.input_size, H.stage_ops(s, 4).blur_kernel,
           c.batch_size, c.num_epochs, c.optim.lr, c.optim.weight_decay)
    assert got[:5] == RECIPES[name][:5], got
    np.testing.assert_allclose(got[5:], RECIPES[name][5:], rtol=1e-12)
    assert c.method == method and c.hai.exits == (1, 2, 3, 4) and c.model.share_encoder
    assert H.stage_ops(s, 4).blur_probability == (0.5 if got[2] else 0.0)
    assert c.hai.fix_predictor_lr == (method == "simsiam_hai") or method == "barlow_hai"
    if name in ("cifar10", "stl10", "tiny_imagenet"):
      assert (c.model.embedding_dim, c.hai.embed_dim, c.hai.predictor_hidden) == (2048, 512, 512)
      assert c.hai.projector_layers == (2 if name == "cifar10" else 3)
    else:   # grey data: flip at the last exit only where the data set allows flipping
      assert c.hai.flip_from == (4 if c.data.flip else 0)


def test_shifted_depthwise_conv_equals_the_grouped_convolution():
  """Same parameters, values and gradients as XLA's grouped convolution (the CPU default);
  a stride-2 SepConv on an odd-sized map has a stride-2 and a stride-1 depthwise conv."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 7, 5))
  convs = [multi_exit.SepConv(6, strides=2, depthwise=d) for d in ("xla", "shifted")]
  variables = convs[0].init(jax.random.PRNGKey(1), x, False)
  assert jax.tree.structure(variables) == jax.tree.structure(
      convs[1].init(jax.random.PRNGKey(1), x, False))
  def loss(c):
    return lambda v, x: jnp.sum(jnp.sin(c.apply(v, x, True, mutable=["batch_stats"])[0]))
  (want, want_grads), (got, got_grads) = (
      jax.jit(jax.value_and_grad(loss(c), argnums=(0, 1)))(variables, x) for c in convs)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert max_diff(got_grads, want_grads) < 1e-4


def tiny(method, **overrides):
  c = digits.get_config(f"{method},tiny")
  c.batch_size = 8
  c.hai.exits = (3, 4)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def simsiam_runs():
  config = tiny("simsiam_hai")
  return config, run(config, 1, 1), run(config, 4, 1)


def test_simsiam_hai_trains_on_four_devices_like_on_one(simsiam_runs):
  _, (_, one, m1), (_, four, m4) = simsiam_runs
  assert set(four[-1].params) == {"encoder", "heads", "predictor"}
  for part in four[-1].params:
    assert max_diff(four[0].params[part], four[-1].params[part]) > 0, part
  step = max(1.0, max_diff(one[0].params, one[1].params))
  assert max_diff(one[-1].params, four[-1].params) < 2e-5 * step
  np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-4)


def test_loss_is_the_sum_of_the_per_exit_simsiam_losses(simsiam_runs):
  config, (exp, states, metrics), _ = simsiam_runs
  method, state, batch = exp.method, states[0], exp.loader.batch_at(0)

  def forward(images):
    views = method.stage_views(state, {"image": images})
    zs, _, _ = method.project(state.params["encoder"], state.batch_stats["encoder"],
                              state.params["heads"], state.batch_stats["heads"], views)
    ps, _ = method.predict(state.params["predictor"], state.batch_stats["predictor"], zs)
    return zs, ps

  zs, ps = jax.vmap(forward, axis_name=parallel.AXIS)(batch["image"])
  def d(p, z):   # D(p, z) = -cos, mean over rows
    p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
    return -np.mean(np.sum(p * z, -1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(z, axis=-1))
  per = []
  for z, p in zip(zs, ps):
    z, p = z[0], p[0]
    b = z.shape[0] // 2
    per.append(0.5 * d(p[:b], z[b:]) + 0.5 * d(p[b:], z[:b]))
  for e, want in zip(config.hai.exits, per):
    np.testing.assert_allclose(metrics[0][f"loss_exit{e}"], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics[0]["loss"], sum(per), rtol=1e-4, atol=1e-6)


def test_probe_reads_only_the_last_exit(simsiam_runs):
  _, (exp, states, _), _ = simsiam_runs
  method, state = exp.method, states[-1]
  views = exp._sample_views()
  features = jax.jit(method.features)
  base = features(state.params, state.batch_stats, views)
  assert set(base) == {"conv", "fc", "embedding"}
  h = method.backbone.apply({"params": state.params["encoder"],
                             "batch_stats": state.batch_stats["encoder"]}, views[0], 4, False)
  np.testing.assert_allclose(base["conv"][:, :h.shape[1]], h, atol=1e-6)
  # Earlier exits' heads and projectors do not reach the features; the last stage does.
  noisy = jax.tree.map(lambda x: x + 1.0, state.params)
  shallow = {**state.params,
             "encoder": {**state.params["encoder"],
                         "exit3_head": noisy["encoder"]["exit3_head"]},
             "heads": {**state.params["heads"], "exit3": noisy["heads"]["exit3"]}}
  assert max_diff(base, features(shallow, state.batch_stats, views)) == 0.0
  deep = {**state.params, "encoder": {**state.params["encoder"],
                                      "stage4_block1": noisy["encoder"]["stage4_block1"]}}
  assert max_diff(base["conv"], features(deep, state.batch_stats, views)["conv"]) > 1e-3


def _numpy_cos(p, z):
  return np.sum(p * z, -1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(z, axis=-1)


def _numpy_barlow(z1, z2, lam):
  """Barlow Twins' Eq. 1 on batch-standardised views (BatchNorm's eps), in NumPy."""
  std = lambda z: (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
  c = std(z1).T @ std(z2) / z1.shape[0]
  off = ~np.eye(c.shape[0], dtype=bool)
  return np.sum((1 - np.diag(c)) ** 2) + lam * np.sum(c[off] ** 2)


def test_each_exits_loss_is_its_base_methods_loss_adapter():
  """exit_loss (the loss adapters of simsiam, byol and barlow_twins on one exit's halves)
  against the base methods' formulas in NumPy, views' rows stacked [view 1; view 2]."""
  facts = methods.DataFacts(view_channels=(1, 1), bank_size=16, steps_per_epoch=2,
                            global_batch=8)
  rng = np.random.default_rng(0)
  p, z = (rng.normal(size=(16, 6)).astype(np.float32) for _ in range(2))
  b = 8
  simsiam = methods.build(tiny("simsiam_hai"), facts)
  want = -0.5 * (np.mean(_numpy_cos(p[:b], z[b:])) + np.mean(_numpy_cos(p[b:], z[:b])))
  np.testing.assert_allclose(simsiam.exit_loss(p, z), want, rtol=1e-5)
  byol = methods.build(tiny("byol_hai"), facts)
  want = np.mean(2 - 2 * _numpy_cos(p[:b], z[b:])) + np.mean(2 - 2 * _numpy_cos(p[b:], z[:b]))
  np.testing.assert_allclose(byol.exit_loss(p, z), want, rtol=1e-5)
  config = tiny("barlow_hai", **{"hai.scale_loss": 0.5, "hai.lambda_offdiag": 0.01})
  barlow = methods.build(config, facts)
  got = jax.vmap(barlow.exit_loss, axis_name=parallel.AXIS)(z[None])[0]
  np.testing.assert_allclose(got, 0.5 * _numpy_barlow(z[:b].astype(np.float64),
                                                      z[b:].astype(np.float64), 0.01),
                             rtol=1e-4)


@pytest.mark.slow  # four more train-step compilations (~2 minutes on a busy 2-core CPU)
@pytest.mark.parametrize("method", ["byol_hai", "barlow_hai"])
def test_byol_and_barlow_hai_train_on_four_devices_like_on_one(method):
  config = tiny(method, **{"hai.base_decay": 0.9})
  _, states, metrics = run(config, 4, 1)
  _, one, one_metrics = run(config, 1, 1)
  m = metrics[0]
  assert np.isfinite(float(m["loss"]))
  np.testing.assert_allclose(m["loss"], m["loss_exit3"] + m["loss_exit4"], rtol=1e-5)
  np.testing.assert_allclose(one_metrics[0]["loss"], m["loss"], rtol=1e-4)
  # Barlow Twins' cross-correlation and the BatchNorms span the global batch: the two runs
  # differ by float32 summation order only (2e-5 seen), far below the step's update.
  update = max_diff(one[0].params, one[1].params)
  assert max_diff(one[-1].params, states[-1].params) < 1e-4 * max(1.0, update), update
  old, new = states
  if method == "byol_hai":   # the target includes the exits' projectors
    tau = 1 - (1 - 0.9) * 2 / 2
    for target, online in (("target", "encoder"), ("target_heads", "heads")):
      want = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, old.params[target],
                          new.params[online])
      assert max_diff(want, new.params[target]) < 1e-6
    assert "target_heads" not in new.opt_state
  else:
    assert "predictor" not in new.params


def test_benchmark_times_each_hai_method_beside_its_plain_baseline(monkeypatch):
  """The methods section's plan puts every *_hai row right after its baseline (none on the
  AlexNet, pairs on resnet18), and the report divides their step times ("vs plain")."""
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "experiments"))
  plan, report = importlib.import_module("benchmark_plan"), importlib.import_module(
      "benchmark_report")
  todo = plan.plan({"methods"}, ["digits_conv", "alexnet_small", "resnet18"], {}, 1, 0, 1,
                   [1], "digits_conv", 128, ["cmc"], 0)
  rows = {e: [s.method for s in todo if s.encoder == e]
          for e in ("digits_conv", "alexnet_small", "resnet18")}
  for hai, base in plan.HAI_BASELINES.items():
    names = rows["digits_conv"]
    assert names.index(hai) == names.index(base) + 1
    assert hai not in rows["alexnet_small"] and base in rows["alexnet_small"]
  assert rows["resnet18"] == ["simsiam", "simsiam_hai", "byol", "byol_hai", "barlow_twins",
                              "barlow_hai"]
  result = lambda step_s: {"views": 2, "step_s": step_s, "temp_mib": 1.0, "peak_rss_mib": 1.0,
                           "lower_s": 0.5, "compile_s": 0.5}
  measured = [(plan.Setting("methods", "resnet18", m, 32), result(t))
              for m, t in (("simsiam", 0.4), ("simsiam_hai", 1.0), ("byol_hai", 2.0))]
  table = "\n".join(report._methods_table(measured))
  assert "| simsiam_hai | 2 | 1.000 | – | 2.50x simsiam |" in table
  assert "| byol_hai | 2 | 2.000 | – | – |" in table            # its baseline did not run
