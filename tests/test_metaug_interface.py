"""MetAug on the feature-augmentation interface: the loss adapters against direct formulas, the
generators as a learned augmenter, the meta-gradient strategy each config selects, and
metaug_ft (Feature Transformation on MetAug's bank negatives): column 0 untouched, score
statistics of what the loss sees, banks fed with original embeddings only, 1 vs 4 devices, the
command line."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metaug_jax import config_check, feature_aug, losses, memory_bank, meta_gradient, parallel
from metaug_jax.augmenters import meta_generators
from metaug_jax.losses import adapters
from metaug_jax.methods import common, metaug

from test_baselines import ROOT, max_diff, run, tiny


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)


def _call(seed=0, views=3, b=4, k=5, n=12, d=6):
  """A bank call on random unit banks: (call, queries, originals)."""
  rng = np.random.default_rng(seed)
  banks = _unit(rng, (views, n, d))
  idx = jnp.asarray(np.concatenate([np.arange(b)[:, None], rng.integers(0, n, (b, k))], 1),
                    jnp.int32)
  return (memory_bank.BankCall(banks, idx), [_unit(rng, (b, d)) for _ in range(views)],
          [_unit(rng, (b, d)) for _ in range(views)])


# ---- the loss adapters ------------------------------------------------------------------------


def test_oucl_adapter_is_the_authors_double_sum_over_the_calls_directions():
  call, queries, originals = _call()
  result = adapters.oucl(call.contrast_batches(queries, originals), scorer=call.scorer,
                         form=3, beta=16.0, gamma_pos=0.0, gamma_neg=0.0, margin=0.25,
                         adaptive=False, scale="code")
  banks, idx = np.asarray(call.banks, np.float64), np.asarray(call.indices)
  d = np.stack([(np.einsum("bd,bkd->bk", np.asarray(queries[x]), banks[y][idx]) + 1) / 2
                for x, y in memory_bank.directions(3)], axis=1)        # (B, 6, 1 + K)
  np.testing.assert_allclose(result.scores, d, atol=1e-6)
  pos, neg = d[:, :, 0], d[:, :, 1:].reshape(d.shape[0], -1)
  # log(1 + sum_k sum_j exp(beta (n_j - p_k))), times 16 / beta = 1 (docs/metaug.md §4.1).
  want = np.log1p(np.exp(16.0 * (neg[:, None, :] - pos[:, :, None])).sum(axis=(1, 2)))
  np.testing.assert_allclose(result.loss, want, rtol=1e-5)
  assert float(result.out_of_range) == 0.0


def test_oucl_adapter_keeps_or_clips_scores_outside_the_unit_range():
  call, queries, originals = _call(seed=1)
  stretched = tuple(b.replace(negatives=2.0 * b.negatives)
                    for b in call.contrast_batches(queries, originals))
  options = dict(form=3, beta=16.0)
  kept = adapters.oucl(stretched, scorer=call.scorer, **options)
  clipped = adapters.oucl(stretched, scorer=call.scorer, score_range="clip", **options)
  raw = np.asarray(kept.scores)
  assert raw.min() < 0 or raw.max() > 1
  np.testing.assert_allclose(float(kept.out_of_range), np.mean((raw < 0) | (raw > 1)),
                             atol=1e-6)
  np.testing.assert_allclose(clipped.scores, np.clip(raw, 0, 1), atol=1e-7)
  assert float(clipped.out_of_range) == float(kept.out_of_range)
  assert not np.allclose(kept.loss, clipped.loss)
  with pytest.raises(ValueError, match="score_range"):
    adapters.oucl(stretched, score_range="wrap", **options)


def test_infonce_adapter_on_per_anchor_and_shared_negatives():
  rng = np.random.default_rng(2)
  q, k = _unit(rng, (5, 4)), _unit(rng, (5, 4))
  for negatives in (_unit(rng, (5, 7, 4)), _unit(rng, (7, 4))):
    batch = feature_aug.ContrastBatch(anchor=q, positive=k[:, None], negatives=negatives)
    loss, (pos, neg) = adapters.infonce(batch, 0.2)
    n = np.asarray(negatives) if negatives.ndim == 3 else np.broadcast_to(negatives, (5, 7, 4))
    logits = np.concatenate([np.sum(np.asarray(q) * np.asarray(k), 1)[:, None],
                             np.einsum("bd,bkd->bk", np.asarray(q), n)], 1) / 0.2
    want = np.log(np.exp(logits).sum(1)) - logits[:, 0]
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(neg, logits[:, 1:] * 0.2, atol=1e-6)


def test_two_view_adapters_are_the_libraries_losses():
  rng = np.random.default_rng(3)
  a, b = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), jnp.asarray(
      rng.normal(size=(6, 5)), jnp.float32)
  pair = feature_aug.ContrastBatch(anchor=a, positive=b[:, None])
  assert float(adapters.negative_cosine(pair)) == float(losses.negative_cosine(a, b))
  assert float(adapters.negative_cosine(pair, form="byol")) == float(losses.byol_loss(a, b))
  assert float(adapters.barlow_twins(pair, 0.01, None)) == float(
      losses.barlow_twins(a, b, 0.01))
  za, zb = a / jnp.linalg.norm(a, axis=1, keepdims=True), b / jnp.linalg.norm(
      b, axis=1, keepdims=True)
  unit_pair = feature_aug.ContrastBatch(anchor=za, positive=zb[:, None])
  assert float(adapters.nt_xent(unit_pair, 0.5, axis_name=None)) == float(
      losses.nt_xent(za, zb, 0.5))


def test_adapters_refuse_what_they_would_silently_drop():
  rng = np.random.default_rng(4)
  q = _unit(rng, (3, 4))
  batch = feature_aug.ContrastBatch(anchor=q, positive=q[:, None], negatives=_unit(rng, (5, 4)))
  with pytest.raises(ValueError, match="infonce.*extra_anchor"):
    adapters.infonce(batch.replace(extra_anchor=q), 0.1)
  with pytest.raises(ValueError, match="negative_cosine.*negatives"):
    adapters.negative_cosine(batch)
  with pytest.raises(ValueError, match="nt_xent.*negatives"):
    adapters.nt_xent(batch, 0.1, axis_name=None)
  with pytest.raises(ValueError, match="oucl.*extra_negative"):
    adapters.oucl([batch.replace(extra_negative=q[:, None])], form=3, beta=16.0)


# ---- the generators, a learned augmenter ------------------------------------------------------


def _generators(num_views=2):
  c = tiny("metaug")
  c.model.embedding_dim, c.model.mag_hidden = 8, 16
  return meta_generators.MetaFeatureGenerators(c, num_views)


def test_generators_extend_each_views_batch_with_its_generated_query():
  gens = _generators()
  rng = np.random.default_rng(5)
  z = [_unit(rng, (4, 8)) for _ in range(2)]
  params, stats = gens.init(jax.random.PRNGKey(0), meta_generators.view_batches(z))
  same_objects = []

  def apply(z):
    views = meta_generators.view_batches(z)
    out, new_stats, _ = gens.apply(params, stats, None, views, jnp.int32(0))
    same_objects.append(all(o.anchor is v.anchor and o.to_enqueue is v.to_enqueue
                            and o.positive is v.positive for o, v in zip(out, views)))
    return [o.extra_anchor for o in out], new_stats

  generated, new_stats = jax.vmap(apply, axis_name=parallel.AXIS)(jnp.stack(z)[None])
  assert same_objects == [True]                         # only extra_anchor is new
  outs = jax.vmap(lambda z: gens.module.apply({"params": params, "batch_stats": stats},
                                              tuple(z), train=True, mutable=["batch_stats"])[0],
                  axis_name=parallel.AXIS)(jnp.stack(z)[None])
  for g, o in zip(generated, outs):
    np.testing.assert_allclose(g[0], o["embedding"][0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(g[0], axis=-1), 1.0, atol=1e-5)
  assert max_diff(new_stats, stats) > 0                 # train-mode BN statistics moved
  # Its own optimiser: the MAGs' SGD state has the MAG tree's shape.
  assert jax.tree.structure(gens.optimizer().init(params)) == jax.tree.structure(
      gens.optimizer().init(jax.tree.map(jnp.zeros_like, params)))


def test_an_augmenter_that_rewrites_to_enqueue_is_refused():
  class Rogue:
    def apply(self, params, state, key, batch, step):
      return batch.replace(to_enqueue=batch.anchor * 2.0), state, {}

  q = _unit(np.random.default_rng(6), (3, 4))
  batch = feature_aug.ContrastBatch(anchor=q, positive=q[:, None], to_enqueue=q)
  with pytest.raises(ValueError, match="changed ContrastBatch.to_enqueue"):
    feature_aug.apply_augmenter(Rogue(), {}, {}, None, batch, 0)


@pytest.mark.parametrize("overrides,strategy", [
    ({}, "forward_over_reverse"),
    ({"meta_gradient": "reverse"}, "reverse"),
    ({"virtual_step_from": "current"}, "fused_forward_over_reverse"),
    ({"virtual_step_from": "current", "meta_gradient": "reverse"}, "fused_reverse"),
    ({"first_order": True, "meta_gradient": "reverse"}, "first_order"),
    ({"first_order": True, "virtual_step_from": "current"}, "first_order"),
    ({"algorithm": "legacy", "first_order": True}, "legacy")])
def test_each_config_selects_one_strategy(overrides, strategy):
  mc = tiny("metaug").metaug
  mc.update(overrides)
  assert meta_gradient.strategy_name(mc) == strategy


# ---- metaug_ft ------------------------------------------------------------------------------


def ft_config(**overrides) -> ml_collections.ConfigDict:
  """metaug_ft on digits' tiny shapes; the first-order meta-gradient from Phase A's gradient,
  the cheapest step to compile (FT is what these tests are about)."""
  return tiny("metaug_ft", **{"metaug.first_order": True, "metaug.virtual_step_from": "current",
                              "metaug.lambda_aug": 0.1, "metaug.lambda_mi": 0.1,
                              "metaug.inner_lr": 0.1, **overrides})


def test_metaug_ft_variant_and_its_checks():
  config = ft_config()
  config_check.validate(config, 4)
  assert config.ft.target == "neg" and config.ft.oucl_scores == "keep"
  config.ft.target = "posneg"
  with pytest.raises(config_check.ConfigError, match="pass --config.ft.target=neg"):
    config_check.validate(config, 1)
  config = ft_config(**{"ft.oucl_scores": "wrap"})
  with pytest.raises(config_check.ConfigError, match="ft.oucl_scores"):
    config_check.validate(config, 1)


def test_metaug_ft_score_options_reach_the_augmenter_and_the_loss():
  from metaug_jax import methods  # pylint: disable=g-import-not-at-top
  facts = methods.DataFacts(view_channels=(1, 1), bank_size=64, steps_per_epoch=1,
                            global_batch=16)
  keep = methods.build(ft_config(), facts)
  clip = methods.build(ft_config(**{"ft.oucl_scores": "clip"}), facts)
  renorm = methods.build(ft_config(**{"ft.oucl_scores": "renormalize"}), facts)
  assert (keep.score_range, clip.score_range, renorm.score_range) == ("keep", "clip", "keep")
  assert keep.augmenter.config.postmix_norm == "none"
  assert renorm.augmenter.config.postmix_norm == "neg"


def _head_metrics(config):
  """Phase A's L_total metrics at the initial state, forward only, one device."""
  exp, _, _ = run(config, 1, 0)
  method = exp.method
  state = exp.init_state()
  batch = exp.loader.batch_at(0)

  def metrics(state, batch):
    inputs = metaug.step_inputs(method, state, batch)
    objective = method.objective(state, inputs)
    z, _ = objective.encode(state.params["encoder"], False)
    _, aux = objective.head(z, state.params["mag"], state.banks, "phase_a", False)
    return aux.metrics

  return jax.device_get(parallel.pmap_step(lambda s, b: (s, metrics(s, b)), exp.devices,
                                           donate=False)(state, batch)[1])


def test_metaug_ft_leaves_column_0_and_logs_the_scores_the_loss_sees():
  plain, with_ft = _head_metrics(tiny("metaug")), _head_metrics(ft_config())
  # Column 0, the positive, is the anchor's own bank row either way.
  for name in ("pos_mean", "pos_std", "aug_pos_mean"):
    np.testing.assert_allclose(with_ft[name], plain[name], rtol=1e-6, err_msg=name)
  assert abs(with_ft["neg_std"] - plain["neg_std"]) > 1e-4      # interpolated negatives
  # The d statistics are FT's post-transformation dot products, rescaled: what OUCL saw.
  np.testing.assert_allclose(with_ft["neg_mean"], (with_ft["score_neg_mean_post"] + 1) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(with_ft["pos_mean"], (with_ft["score_pos_mean_post"] + 1) / 2,
                             rtol=1e-5)
  assert 0 < with_ft["ft_lambda_neg"] < 1 and "ft_lambda_pos" not in with_ft
  assert with_ft["oucl_scores_out_of_range"] == 0.0   # scalar interpolation stays in range
  assert "oucl_scores_out_of_range" not in plain


@functools.lru_cache(maxsize=None)
def _ft_one_device():
  return run(ft_config(), 1, 2)


@pytest.mark.slow  # two MetAug + FT steps (~1.5 minutes)
def test_metaug_ft_banks_receive_the_original_embeddings_only():
  # The written rows are normalise(0.5 m + 0.5 z) with z the encoders' embeddings of the step's
  # views at the step's starting parameters (Phase A's), not the generated queries (nor FT's
  # mixed rows, which never reach to_enqueue).
  exp, states, _ = _ft_one_device()
  method, old, new = exp.method, states[0], states[1]
  batch = exp.loader.batch_at(0)

  def embeddings(images):
    views = common.train_views(images, common.step_keys(old, ("augment",))["augment"],
                               method.config.data)
    outs = method.encoder.apply({"params": old.params["encoder"],
                                 "batch_stats": old.batch_stats["encoder"]}, views, train=True,
                                mutable=["batch_stats"])[0]
    return jnp.stack(common.embeddings(outs))

  z = jax.vmap(embeddings, axis_name=parallel.AXIS)(batch["image"])[0]      # (V, B, D)
  rows = np.asarray(batch["index"][0])
  want = 0.5 * np.asarray(old.banks)[:, rows] + 0.5 * np.asarray(z)
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(new.banks)[:, rows], want, atol=2e-5)
  others = np.setdiff1d(np.arange(old.banks.shape[1]), rows)
  np.testing.assert_array_equal(np.asarray(new.banks)[:, others], np.asarray(old.banks)[:, others])


@pytest.mark.slow  # two MetAug + FT step compilations
def test_metaug_ft_trains_on_four_devices_like_on_one():
  _, one, m1 = _ft_one_device()
  _, four, m4 = run(ft_config(), 4, 2)
  assert all(np.isfinite(float(v)) for m in m4 for v in m.values())
  step = max(1.0, max_diff(one[0].params, one[1].params))
  assert max_diff(one[-1].params, four[-1].params) < 2e-5 * step
  assert max_diff(one[-1].banks, four[-1].banks) < 2e-5 * step
  for key in ("loss_total", "meta_loss", "ft_lambda_neg", "score_neg_mean_post"):
    np.testing.assert_allclose(m1[-1][key], m4[-1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a CLI run in a subprocess
def test_cli_trains_metaug_ft_from_its_config_variant(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT,
                                                                  os.environ.get("PYTHONPATH")])))
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "metaug_jax.main",
                      "--config=configs/digits.py:metaug_ft,tiny", "--config.num_train_steps=2",
                      "--config.eval.probe_after_training=False", "--config.eval.plots=False",
                      "--config.eval.monitor_every_steps=0", "--config.log_every_steps=1",
                      f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert len(records) == 2 and all("oucl_scores_out_of_range" in rec and "ft_lambda_neg" in rec
                                   for rec in records)
