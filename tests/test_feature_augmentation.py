"""FA, the configurable feature-augmentation module (augmenters/feature_augmentation.py), and
moco_fa, simclr_fa, byol_fa, simsiam_fa, cmc_fa, oucl_fa: the operators against NumPy on fixed keys, the
identity settings, the gradient-flow policies, the generator's reversed gradient, draws that do
not depend on the device split, the encoders' projector path, every placement x op traced as a
full step, and a few real steps: identity FA = the plain method, the policies' gradients part
by part, 1 vs 4 devices with the queue kept original; config errors one line each."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metaug_jax import config_check, feature_aug, methods, parallel, train
from metaug_jax.augmenters import feature_augmentation as fa_lib
from metaug_jax.models import encoders

# Shared with tests/test_baselines.py (and its cached one-step states of the plain methods).
from test_baselines import _plain_step, max_diff, run, tiny

KEY = jax.random.key(7)


def _config(**overrides):
  c = fa_lib.defaults()
  c.update(overrides)
  return c


def _batch(b=8, d=6, k=5, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  anchor = unit(jax.random.normal(keys[0], (b, d)))
  positive = unit(jax.random.normal(keys[1], (b, d)))
  return feature_aug.ContrastBatch(anchor=anchor, positive=positive[:, None],
                                   negatives=unit(jax.random.normal(keys[2], (k, d))),
                                   to_enqueue=positive)


def _apply(config, batch, params=None, global_batch=None, key=KEY):
  aug = fa_lib.FeatureAugmentation(config, global_batch)
  if params is None:
    params = aug.init(jax.random.key(1), batch)[0]
  out, _, metrics = feature_aug.apply_augmenter(aug, params, {}, key, batch, jnp.int32(0))
  return out, metrics, aug


# ---- the operators against NumPy on fixed keys -----------------------------------------------


@pytest.mark.parametrize("relative", [True, False])
def test_noise_copies_are_x_plus_sigma_eps_with_the_documented_draws(relative):
  batch = _batch()
  out, _, aug = _apply(_config(side="both", grad_policy="through", noise_std=0.3, renorm=False,
                               noise_relative=relative), batch)
  keys = aug.keys(KEY)
  for got, x, name in ((out.anchor, batch.anchor, "online"),
                       (out.positive[:, 0], batch.positive[:, 0], "target")):
    x = np.asarray(x, np.float64)
    eps = np.asarray(jax.random.normal(keys[name], x.shape))
    scale = np.sqrt(np.mean(x ** 2, axis=1, keepdims=True)) if relative else 1.0
    np.testing.assert_allclose(got, x + 0.3 * scale * eps, rtol=1e-6, atol=1e-7)
  assert out.to_enqueue is batch.to_enqueue and not out.unit_norm


def test_dropout_copies_keep_a_bernoulli_mask_and_rescale():
  batch = _batch(b=64, d=32)
  out, _, aug = _apply(_config(op="dropout", dropout_rate=0.25, renorm=False), batch)
  keep = np.asarray(jax.random.bernoulli(aug.keys(KEY)["target"], 0.75, (64, 32)))
  x = np.asarray(batch.positive[:, 0])
  np.testing.assert_allclose(out.positive[:, 0], np.where(keep, x / 0.75, 0.0), rtol=1e-6)
  np.testing.assert_array_equal(out.anchor, batch.anchor)   # side target: anchors untouched
  assert abs(keep.mean() - 0.75) < 0.03


@pytest.mark.parametrize("distribution,extrapolate", [("beta", False), ("beta", True),
                                                      ("fixed", False)])
def test_intra_mix_mixes_the_two_views_with_one_coefficient(distribution, extrapolate):
  batch = _batch()
  config = _config(op="intra_mix", side="both", grad_policy="through", renorm=False,
                   mix_distribution=distribution, mix_extrapolate=extrapolate, mix_lambda=0.7)
  out, metrics, aug = _apply(config, batch)
  u = float(jax.random.beta(aug.keys(KEY)["mix"], 2.0, 2.0, (), jnp.float32))
  lam = {("beta", False): u, ("beta", True): 1 + u, ("fixed", False): 0.7}[distribution,
                                                                             extrapolate]
  assert float(metrics["fa_lambda"]) == pytest.approx(lam, rel=1e-6)
  q, k = np.asarray(batch.anchor), np.asarray(batch.positive[:, 0])
  np.testing.assert_allclose(out.anchor, lam * q + (1 - lam) * k, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.positive[:, 0], lam * k + (1 - lam) * q, rtol=1e-5, atol=1e-6)


def test_inter_mix_makes_virtual_instances_with_one_partner_for_both_views():
  batch = _batch(b=9)
  out, metrics, aug = _apply(_config(op="inter_mix", side="both", grad_policy="through",
                                     renorm=False), batch)
  partner = np.asarray(aug.partners(KEY, 9))
  # One cycle through all rows: a permutation without fixed points.
  assert sorted(partner) == list(range(9)) and np.all(partner != np.arange(9))
  row, seen = 0, set()
  while row not in seen:
    seen.add(row)
    row = partner[row]
  assert len(seen) == 9
  lam = float(metrics["fa_lambda"])
  q, k = np.asarray(batch.anchor), np.asarray(batch.positive[:, 0])
  np.testing.assert_allclose(out.anchor, lam * q + (1 - lam) * q[partner], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.positive[:, 0], lam * k + (1 - lam) * k[partner], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("op", ["noise", "inter_mix", "learned"])
def test_extra_negatives_are_copies_of_the_negatives_and_to_enqueue_is_untouched(op):
  batch = _batch()
  config = _config(usage="extra_negative", op=op, grad_policy="through", renorm=True)
  out, _, aug = _apply(config, batch)
  assert out.extra_negative.shape == (1,) + batch.negatives.shape
  for field in ("anchor", "positive", "negatives"):
    np.testing.assert_array_equal(getattr(out, field), getattr(batch, field))
  assert out.to_enqueue is batch.to_enqueue and out.unit_norm   # renorm keeps unit norm
  n = np.asarray(batch.negatives)
  np.testing.assert_allclose(np.linalg.norm(out.extra_negative[0], axis=-1), 1.0, rtol=1e-5)
  if op == "inter_mix":
    partner = np.asarray(aug.partners(KEY, n.shape[0], of_negatives=True))
    lam = float(fa_lib.mix_coefficient(aug.keys(KEY)["mix"], config))
    mixed = lam * n + (1 - lam) * n[partner]
    mixed /= np.linalg.norm(mixed, axis=-1, keepdims=True)
    np.testing.assert_allclose(out.extra_negative[0], mixed, rtol=1e-5, atol=1e-6)
  if op == "learned":   # the generator starts at the identity
    np.testing.assert_allclose(out.extra_negative[0], n, atol=1e-6)


# ---- identity, renorm and the gradient policies ---------------------------------------------


@pytest.mark.parametrize("op,setting", [("noise", {"noise_std": 0.0}),
                                        ("dropout", {"dropout_rate": 0.0}),
                                        ("intra_mix", {"mix_distribution": "fixed",
                                                       "mix_lambda": 1.0})])
@pytest.mark.parametrize("renorm", [True, False])
def test_identity_settings_return_the_features_bit_for_bit(op, setting, renorm):
  batch = _batch()
  out, _, _ = _apply(_config(op=op, side="both", grad_policy="through", renorm=renorm,
                             **setting), batch)
  np.testing.assert_array_equal(out.anchor, batch.anchor)
  np.testing.assert_array_equal(out.positive, batch.positive)


def test_renorm_gives_each_copy_its_originals_norm():
  batch = _batch()
  batch = batch.replace(anchor=batch.anchor * jnp.arange(1, 9)[:, None], unit_norm=False)
  out, _, _ = _apply(_config(side="both", grad_policy="through", noise_std=0.5), batch)
  np.testing.assert_allclose(np.linalg.norm(out.anchor, axis=-1), np.arange(1, 9), rtol=1e-5)
  assert max_diff(out.anchor, batch.anchor) > 0.1


@pytest.mark.parametrize("op", ["noise", "intra_mix"])
def test_grad_policies_change_exactly_the_gradient_through_the_copy(op):
  batch = _batch()
  w = jax.random.normal(jax.random.key(3), batch.anchor.shape)
  lam = 0.6

  def grads(policy):
    config = _config(op=op, grad_policy=policy, noise_std=0.2, renorm=False,
                     mix_distribution="fixed", mix_lambda=lam)
    def f(anchor, positive):
      b = batch.replace(anchor=anchor, positive=positive[:, None])
      out, _, _ = _apply(config, b)
      return jnp.sum(out.positive[:, 0] * w)   # side target: the loss reads the key copy
    return jax.grad(f, argnums=(0, 1))(batch.anchor, batch.positive[:, 0])

  zero = np.zeros(batch.anchor.shape)
  g_anchor, g_positive = grads("through")
  # noise: d(x + sigma sg(rms) eps)/dx = I; intra_mix: k' = l k + (1 - l) q.
  np.testing.assert_allclose(g_positive, w * (lam if op == "intra_mix" else 1.0), rtol=1e-6)
  np.testing.assert_allclose(g_anchor, w * (1 - lam) if op == "intra_mix" else zero, atol=1e-7)
  for policy in ("detach_input", "detach_output"):
    for g in grads(policy):
      np.testing.assert_array_equal(g, zero)


@pytest.mark.parametrize("mode,weight", [("adversarial", 1.0), ("adversarial", 4.0),
                                         ("joint", 4.0)])
def test_generator_gets_the_reversed_or_plain_gradient_of_the_fa_term(mode, weight):
  batch = _batch()
  w = jax.random.normal(jax.random.key(3), batch.anchor.shape)
  config = _config(op="learned", grad_policy="detach_input", generator_mode=mode, weight=weight,
                   generator_hidden=16, generator_noise_dim=4, renorm=False)
  aug = fa_lib.FeatureAugmentation(config)
  params = aug.init(jax.random.key(1), batch)[0]
  out, _, _ = _apply(config, batch, params)
  np.testing.assert_array_equal(out.positive, batch.positive)   # zero residual at init
  # Move off the identity so that every layer has a gradient.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(5), p.shape),
                        params)

  def term(params, x):   # weight x the FA term, as the method's loss holds it
    out, metrics, _ = _apply(config, batch.replace(positive=x[:, None]), params)
    return weight * jnp.sum(out.positive[:, 0] * w), metrics

  (_, metrics), (g_params, g_x) = jax.value_and_grad(term, argnums=(0, 1), has_aux=True)(
      params, batch.positive[:, 0])
  np.testing.assert_array_equal(g_x, np.zeros(g_x.shape))   # detach_input: nothing reaches x

  def plain(params):   # the same copy without the gradient scaling
    noise = jax.random.normal(aug.keys(KEY)["target"], (8, 4))
    return jnp.sum(aug.generator.apply({"params": params}, batch.positive[:, 0], noise) * w)

  want = jax.tree.map(lambda g: (-1.0 if mode == "adversarial" else 1.0) * g,
                      jax.grad(plain)(params))
  assert max_diff(g_params, want) < 1e-5 * max(1.0, max_diff(want, jax.tree.map(
      jnp.zeros_like, want)))
  # The similarity penalty: mean max(0, delta - cos(g(x), x)), in NumPy.
  noise = jax.random.normal(aug.keys(KEY)["target"], (8, 4))
  y = np.asarray(aug.generator.apply({"params": params}, batch.positive[:, 0], noise))
  x = np.asarray(batch.positive[:, 0])
  cos = np.sum(y * x, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(x, axis=1)
  np.testing.assert_allclose(metrics[fa_lib.PENALTY], np.mean(np.maximum(0, 0.9 - cos)),
                             rtol=1e-5)


@pytest.mark.parametrize("op", ["noise", "dropout", "inter_mix", "learned"])
def test_copies_do_not_depend_on_how_the_batch_is_split_over_devices(op):
  batch = _batch(b=8)
  config = _config(op=op, side="both", grad_policy="through", generator_hidden=16)
  aug = fa_lib.FeatureAugmentation(config)
  params = aug.init(jax.random.key(1), batch)[0]
  whole, _, _ = _apply(config, batch, params)
  per_device = batch.replace(
      anchor=batch.anchor.reshape(4, 2, -1), positive=batch.positive.reshape(4, 2, 1, -1),
      to_enqueue=batch.to_enqueue.reshape(4, 2, -1), negatives=jnp.stack([batch.negatives] * 4))
  split = jax.pmap(lambda b: _apply(config, b, params, global_batch=8)[0],
                   axis_name=parallel.AXIS)(per_device)
  np.testing.assert_allclose(split.anchor.reshape(8, -1), whole.anchor, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(split.positive.reshape(8, 1, -1), whole.positive, rtol=1e-6,
                             atol=1e-7)


# ---- the encoders' projector path -----------------------------------------------------------


# One hidden fc layer named from 1 (digits_conv, resnet18) and two named from 6 (the AlexNets).
@pytest.mark.parametrize("name,size,width", [("digits_conv", 16, 0.25),
                                             ("alexnet_small", 32, 0.125)])
def test_project_only_is_the_encoders_own_fc_tail(name, size, width):
  model = encoders.build_encoder(ml_collections.ConfigDict(
      {"encoder": name, "embedding_dim": 16, "width": width, "dtype": "float32"}))
  x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  full, stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
  head, head_stats = model.apply(variables, full["conv"], train=True, project_only=True,
                                 mutable=["batch_stats"])
  for level in ("conv", "fc", "projection", "embedding"):
    np.testing.assert_allclose(head[level], full[level], rtol=1e-6, atol=1e-6)
  # The tail's BatchNorms (bn*) update as in the full forward; the backbone's stay as they were.
  for name, value in head_stats["batch_stats"].items():
    want = (stats if name.startswith("bn") else variables)["batch_stats"][name]
    assert max_diff(value, want) < 1e-6, name


# ---- the methods ----------------------------------------------------------------------------


def _valid(method: str, placement: str, op: str) -> dict:
  """The fa overrides of one placement x op combination, with a side / policy it allows."""
  ov = {"fa.placement": placement, "fa.op": op, "fa.grad_policy": "through"}
  if op == "inter_mix":
    ov["fa.side"] = "both"
  elif placement == "predictor":
    ov["fa.side"] = "online"
  return ov


TRACED = [(m, p, o) for m, placements in (("simsiam_fa", fa_lib.PLACEMENTS),
                                          ("simclr_fa", ("backbone", "projector")))
          for p, o in itertools.product(placements, fa_lib.OPS)]
# The bank methods: FA at the projector output (what the banks hold), no generator.
TRACED += [(m, "projector", o) for m in ("cmc_fa", "oucl_fa") for o in fa_lib.OPS
           if o != "learned"]


@pytest.mark.parametrize("method,placement,op", TRACED)
def test_every_placement_and_op_traces_a_full_step(method, placement, op):
  """The whole pmapped step, traced on abstract values (shapes and code paths, no compile);
  the real steps below run a few of these."""
  config = tiny(method, **_valid(method, placement, op), **{"fa.num_copies": 2})
  config.num_devices = 1
  exp = train.build_experiment(config)
  state = exp.abstract_state()
  step = jax.pmap(exp.method.train_step, axis_name=parallel.AXIS, in_axes=(None, 0),
                  out_axes=(None, None))
  new_state, metrics = jax.eval_shape(step, state, exp.loader.batch_at(0))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state)
  assert {"loss_orig", "loss_fa", "fa_weight"} <= set(metrics)
  if method not in ("cmc_fa", "oucl_fa"):
    assert {"loss", "projection_std_per_dim"} <= set(metrics)
  assert ("augmenter" in state.params) == (op == "learned")


IDENTITY = {"fa.usage": "replace", "fa.noise_std": 0.0, "fa.dropout_rate": 0.0,
            "fa.mix_distribution": "fixed", "fa.mix_lambda": 1.0}


@pytest.mark.parametrize("method,fa_method,placement,op,side,policy", [
    ("moco", "moco_fa", "backbone", "noise", "both", "through"),
    ("simclr", "simclr_fa", "projector", "dropout", "both", "through"),
    ("byol", "byol_fa", "backbone", "intra_mix", "both", "through"),
    ("cmc", "cmc_fa", "projector", "noise", "both", "through"),
    ("metaug_oucl_only", "oucl_fa", "projector", "intra_mix", "both", "through")])
def test_identity_fa_reproduces_the_plain_methods_step(method, fa_method, placement, op, side,
                                                       policy):
  """sigma = 0, p = 0 or lambda = 1 with usage=replace: the plain method's loss, gradients (so
  parameters after a step), statistics and queue or banks; backbone copies are re-projected."""
  config = tiny(fa_method, **IDENTITY, **{"fa.placement": placement, "fa.op": op,
                                          "fa.side": side, "fa.grad_policy": policy})
  _, states, metrics = run(config, 1, 1)
  plain = _plain_step(method)
  step = max(1e-3, max_diff(states[0].params["encoder"], plain.params["encoder"]))
  assert max_diff(plain.params, states[1].params) < 1e-5 * step
  assert max_diff(plain.batch_stats, states[1].batch_stats) < 1e-6
  if plain.banks is not None:
    assert max_diff(plain.banks, states[1].banks) == 0
  m = metrics[0]
  assert m.get("loss", m.get("loss_total")) == pytest.approx(
      m["loss_orig"] * (2 if method == "cmc" else 1), rel=1e-6)   # CMC sums its directions
  assert m["loss_fa"] == pytest.approx(m["loss_orig"], rel=1e-6)


@functools.lru_cache(maxsize=None)
def _simsiam_backbone_step(policy: str):
  """One step of simsiam_fa with identity copies of the target's backbone feature."""
  config = tiny("simsiam_fa", **IDENTITY, **{"fa.placement": "backbone", "fa.op": "noise",
                                            "fa.side": "target", "fa.grad_policy": policy})
  return run(config, 1, 1)[1]


def _parts(params) -> dict:
  """{backbone, projector, predictor} parameters of a SimSiam state (digits_conv)."""
  encoder = params["encoder"]["view_0"]
  return {"backbone": {k: v for k, v in encoder.items() if k.startswith("conv")},
          "projector": {k: v for k, v in encoder.items() if not k.startswith("conv")},
          "predictor": params["predictor"]}


@pytest.mark.slow  # four compiled steps (three policies and plain SimSiam)
def test_simsiam_gradient_policies_change_exactly_the_parts_they_should():
  """Target copies of h2 (sigma = 0), re-projected, in place of the target:
  detach_output: a stop-gradient target, so the plain step; detach_input: projector(FA(sg(h2)))
  adds gradient to the projector only; through: also to the backbone, not the predictor."""
  before, output = _simsiam_backbone_step("detach_output")
  _, inputs = _simsiam_backbone_step("detach_input")
  _, through = _simsiam_backbone_step("through")
  plain = _plain_step("simsiam")
  scale = max_diff(before.params, plain.params)   # the size of one step
  assert max_diff(output.params, plain.params) < 1e-5 * scale
  for a, b, moved in ((inputs, output, "projector"), (through, inputs, "backbone")):
    diffs = {part: max_diff(x, _parts(b.params)[part]) for part, x in _parts(a.params).items()}
    assert diffs[moved] > 1e-2 * scale, diffs
    assert all(d < 1e-5 * scale for part, d in diffs.items() if part != moved), diffs


@pytest.mark.slow  # two compiled steps (1 and 4 devices)
def test_moco_fa_with_a_generator_trains_on_four_devices_like_on_one():
  """Learned copies of both sides at the backbone, two per step: the generator and the
  encoders move identically on 1 and 4 devices, and the queue takes only the original keys
  (the same queue and key encoder as plain MoCo after a step)."""
  config = tiny("moco_fa", **{"fa.placement": "backbone", "fa.op": "learned",
                              "fa.side": "both", "fa.grad_policy": "through",
                              "fa.num_copies": 2, "fa.generator_hidden": 32})
  config_check.validate(config, 4)
  _, one, m1 = run(config, 1, 1)
  _, four, m4 = run(config, 4, 1)
  assert all(np.isfinite(float(v)) for v in m4[0].values())
  assert m1[0]["fa_generator_grad_norm"] > 0
  assert max_diff(one[0].params["augmenter"], one[1].params["augmenter"]) > 0
  step = max(1.0, max_diff(one[0].params, one[1].params))
  assert max_diff(one[1].params, four[1].params) < 2e-5 * step
  assert max_diff(one[1].banks, four[1].banks) < 2e-5 * step
  np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-5)
  plain = _plain_step("moco")
  assert max_diff(plain.banks, one[1].banks) == 0
  assert max_diff(plain.params["key_encoder"], one[1].params["key_encoder"]) == 0


# ---- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,overrides,expected", [
    ("moco_fa", {"fa.placement": "predictor", "fa.side": "online", "fa.grad_policy": "through"},
     "needs a method with a predictor"),
    ("simsiam_fa", {"fa.placement": "predictor"}, "only the online side"),
    ("byol_fa", {"fa.usage": "extra_negative"}, "has no negatives"),
    ("moco_fa", {"fa.usage": "extra_negative", "fa.placement": "backbone"}, "projector outputs"),
    ("simclr_fa", {"fa.usage": "extra_negative", "fa.op": "intra_mix"}, "does not have"),
    ("moco_fa", {"fa.usage": "extra_negative", "fa.side": "both",
                 "fa.grad_policy": "through"}, "belong to the target side"),
    ("moco_fa", {"fa.op": "inter_mix"}, "virtual instance"),
    ("simclr_fa", {"fa.side": "online"}, "would train nothing"),
    ("byol_fa", {"fa.op": "learned"}, "without gradient"),
    ("simsiam_fa", {"fa.op": "learned", "fa.grad_policy": "through", "fa.weight": 0.0},
     "without gradient"),
    ("simsiam_fa", {"fa.op": "learned", "fa.grad_policy": "through", "fa.num_copies": 2,
                    "fa.generator_noise_dim": 0}, "are identical"),
    ("moco_fa", {"fa.num_copies": 5}, "config.fa.num_copies=5 must be an integer in [1, 4]"),
    ("moco_fa", {"fa.dropout_rate": 1.0}, "config.fa.dropout_rate=1.0 must be"),
    ("moco_fa", {"fa.op": "mixup"}, "config.fa.op='mixup' is not one of"),
    ("cmc_fa", {"fa.placement": "backbone"}, "whose rows are projector outputs"),
    ("oucl_fa", {"fa.usage": "extra_negative"}, "sampled per anchor from the banks"),
    ("cmc_fa", {"fa.op": "learned", "fa.grad_policy": "through"}, "trains no generator"),
])
def test_config_errors_are_one_line_each(method, overrides, expected):
  with pytest.raises(config_check.ConfigError) as err:
    config_check.validate(tiny(method, **overrides), 1)
  lines = str(err.value).splitlines()
  assert len(lines) == 1 and expected in lines[0], lines


def test_every_fa_methods_variant_is_valid_as_it_is():
  for method in ("moco_fa", "simclr_fa", "byol_fa", "simsiam_fa", "cmc_fa", "oucl_fa"):
    config_check.validate(tiny(method), 4)


@pytest.mark.parametrize("usage,before,after", [("extra_positive", (1.0, 0.0), (1.0, 0.5)),
                                                ("replace", (1.0, 0.0), (0.0, 1.0)),
                                                ("extra_negative", (1.0, 0.0), (0.0, 1.0))])
def test_fa_weights_switch_on_at_the_warmup_step(usage, before, after):
  config = tiny("moco_fa", **{"fa.usage": usage, "fa.weight": 0.5, "fa.warmup_steps": 3})
  facts = methods.DataFacts(view_channels=(1, 1), bank_size=64, steps_per_epoch=4,
                            global_batch=16)
  method = methods.build(config, facts)
  for step, want in ((2, before), (3, after), (9, after)):
    assert tuple(float(w) for w in method.fa_weights(jnp.int32(step))) == want
