"""Feature Transformation (augmenters/feature_transform.py) and moco_ft / cmc_ft: the closed
forms of positive extrapolation, the coefficient ranges, negative interpolation along K, the
gradient through the transformed key, every option, the untouched queue, 1 vs 4 devices, and
the score-distribution metrics and PNG of a CLI run."""

import functools
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metaug_jax import config_check, feature_aug, losses
from metaug_jax.augmenters import feature_transform as ft
from metaug_jax.augmenters import score_stats
from metaug_jax.evaluation import plots

# Shared with tests/test_baselines.py (and its cached one-step states of plain MoCo and CMC,
# so the comparisons below cost no compile when both files run in one session).
from test_baselines import ROOT, _plain_step, max_diff, run, tiny


def _unit(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _batch(per_anchor=False, b=6, k=10, d=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, pos = _unit(keys[0], (b, d)), _unit(keys[1], (b, d))
  neg = _unit(keys[2], (b, k, d) if per_anchor else (k, d))
  return feature_aug.ContrastBatch(anchor=q, positive=pos[:, None], negatives=neg,
                                   to_enqueue=pos)


def _config(**overrides) -> ml_collections.ConfigDict:
  c = ft.defaults()
  c.update(overrides)
  return c


def _apply(config, batch, seed=1):
  aug = ft.FeatureTransform(config)
  return feature_aug.apply_augmenter(aug, {}, {}, jax.random.key(seed), batch, jnp.int32(0))


# ---- the closed forms and the coefficients --------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 1.3, 1.5, 1.97])
def test_positive_extrapolation_closed_forms(lam):
  b = _batch(b=32, d=16, seed=3)
  q, k = np.asarray(b.anchor, np.float64), np.asarray(b.positive[:, 0], np.float64)
  q_hat, k_hat = map(np.asarray, ft.mix_positive(b.anchor, b.positive[:, 0], jnp.float32(lam)))
  s = np.sum(q * k, axis=1)
  c = 2 * lam * (lam - 1) * (1 - s)
  np.testing.assert_allclose(np.sum(q_hat * k_hat, axis=1), s - c, atol=1e-5)
  np.testing.assert_allclose(np.sum(q_hat ** 2, axis=1), 1 + c, atol=1e-5)
  np.testing.assert_allclose(np.sum(k_hat ** 2, axis=1), 1 + c, atol=1e-5)
  cos = np.sum(q_hat * k_hat, axis=1) / np.sqrt(np.sum(q_hat ** 2, 1) * np.sum(k_hat ** 2, 1))
  np.testing.assert_allclose(cos, (s - c) / (1 + c), atol=1e-5)
  np.testing.assert_allclose(q_hat, lam * q + (1 - lam) * k, atol=1e-6)


def test_worked_example_of_the_docs():
  # s = 0.72, l = 1.5: c = 2 * 1.5 * 0.5 * 0.28 = 0.42, raw score 0.30, cosine 0.30 / 1.42.
  q = jnp.array([[1.0, 0.0]])
  k = jnp.array([[0.72, np.sqrt(1 - 0.72 ** 2)]])
  q_hat, k_hat = ft.mix_positive(q, k, jnp.float32(1.5))
  np.testing.assert_allclose(float(jnp.sum(q_hat * k_hat)), 0.30, atol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(q_hat ** 2)), 1.42, atol=1e-6)


@pytest.mark.parametrize("distribution,alpha", [("beta", 2.0), ("beta", 1.6), ("beta", 0.5),
                                                ("uniform", 1.0)])
def test_coefficients_lie_in_their_ranges(distribution, alpha):
  u = np.asarray(ft.draw_unit(jax.random.key(0), (4000,), distribution, alpha))
  lam_pos = np.asarray(ft.positive_coefficient(jnp.asarray(u), True))
  if alpha >= 1:   # open intervals; below 1 the density piles up at 0 and 1 and float32 rounds
    assert np.all(u > 0) and np.all(u < 1) and np.all(lam_pos > 1) and np.all(lam_pos < 2)
  assert np.all(u >= 0) and np.all(u <= 1) and np.all(lam_pos >= 1) and np.all(lam_pos <= 2)
  np.testing.assert_allclose(lam_pos.mean(), 1.5, atol=0.02)   # symmetric: E[l+] = 1.5
  if distribution == "beta":  # Var Beta(a, a) = 1 / (4 (2a + 1))
    np.testing.assert_allclose(u.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.1)
  assert np.array_equal(np.asarray(ft.positive_coefficient(jnp.asarray(u), False)), u)


def test_released_defaults_draw_one_scalar_of_each_per_step():
  batch = _batch()
  out, _, metrics = _apply(_config(score_stats=False), batch)
  lp, ln = float(metrics["ft_lambda_pos"]), float(metrics["ft_lambda_neg"])
  assert 1 < lp < 2 and 0 < ln < 1
  np.testing.assert_allclose(out.anchor, lp * batch.anchor + (1 - lp) * batch.positive[:, 0],
                             atol=1e-6)
  np.testing.assert_allclose(out.positive[:, 0],
                             lp * batch.positive[:, 0] + (1 - lp) * batch.anchor, atol=1e-6)
  # The negatives: l n_j + (1 - l) n_pi(j) for one permutation pi of the K rows.
  n, n_hat = np.asarray(batch.negatives), np.asarray(out.negatives)
  partner = (n_hat - ln * n) / (1 - ln)
  matches = np.argmin(np.linalg.norm(partner[:, None] - n[None], axis=-1), axis=1)
  assert sorted(matches) == list(range(n.shape[0]))
  np.testing.assert_allclose(partner, n[matches], atol=1e-5)
  assert not out.unit_norm and out.to_enqueue is batch.to_enqueue


def test_negative_interpolation_mixes_along_k_and_cannot_raise_the_hardest_negative():
  batch = _batch(per_anchor=True, b=5, k=12)
  perm = jax.random.permutation(jax.random.key(4), 12)
  n_hat = ft.mix_negatives(batch.negatives, jnp.float32(0.3), perm)
  n = np.asarray(batch.negatives)
  np.testing.assert_allclose(n_hat, 0.3 * n + 0.7 * n[:, np.asarray(perm)], atol=1e-6)
  before = np.einsum("bd,bkd->bk", batch.anchor, n)
  after = np.einsum("bd,bkd->bk", batch.anchor, n_hat)
  assert np.all(after.max(1) <= before.max(1) + 1e-6)
  assert np.all(after.min(1) >= before.min(1) - 1e-6)
  assert np.all(np.linalg.norm(n_hat, axis=-1) <= 1 + 1e-6)   # rows shrink, never grow


def test_the_gradient_reaches_the_query_through_the_transformed_key():
  batch = _batch(b=8, k=16, d=8)
  lam = jnp.float32(1.4)

  def loss(q, stop_key):
    q_hat, k_hat = ft.mix_positive(q, batch.positive[:, 0], lam)
    if stop_key:
      k_hat = jax.lax.stop_gradient(k_hat)
    return jnp.mean(losses.infonce_from_scores(jnp.sum(q_hat * k_hat, 1),
                                               q_hat @ batch.negatives.T, 0.2))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g, g_sg = grad(batch.anchor, False), grad(batch.anchor, True)
  assert float(jnp.max(jnp.abs(g - g_sg))) > 1e-3
  # d(q' . k')/dq = l k' + (1 - l) q' exactly (both ends carry q).
  q_hat, k_hat = ft.mix_positive(batch.anchor, batch.positive[:, 0], lam)
  g_pos = jax.grad(lambda q: jnp.sum(jnp.sum(
      jnp.stack(ft.mix_positive(q, batch.positive[:, 0], lam)).prod(0), 1)))(batch.anchor)
  np.testing.assert_allclose(g_pos, lam * k_hat + (1 - lam) * q_hat, atol=1e-5)


# ---- every option ---------------------------------------------------------------------------


# Every target x granularity; shared (K, D) negatives with the positive-side granularities,
# per-anchor (B, K, D) ones with the others.
OPTIONS = [(t, g, g in ("none", "neg")) for t, g in itertools.product(ft.TARGETS,
                                                                       ft.GRANULARITIES)]


@pytest.mark.parametrize("target,granularity,per_anchor", OPTIONS)
def test_every_target_and_granularity_runs_with_the_promised_shapes(target, granularity,
                                                                    per_anchor):
  batch = _batch(per_anchor=per_anchor)
  out, _, metrics = _apply(_config(target=target, granularity=granularity), batch)
  chex_shapes = jax.tree.map(jnp.shape, (out.anchor, out.positive, out.negatives))
  assert chex_shapes == jax.tree.map(jnp.shape, (batch.anchor, batch.positive, batch.negatives))
  assert out.to_enqueue is batch.to_enqueue
  pos_changed = max_diff(out.anchor, batch.anchor) > 0
  neg_changed = max_diff(out.negatives, batch.negatives) > 0
  assert pos_changed == (target != "neg") and neg_changed == (target != "pos")
  if target != "neg":   # element-wise l+ varies within a row, a scalar does not
    lam = (np.asarray(out.anchor) - np.asarray(batch.positive[:, 0])) / np.asarray(
        batch.anchor - batch.positive[:, 0])
    assert (np.ptp(lam) > 1e-3) == (granularity in ("pos", "both"))
    assert np.all((lam > 1 - 1e-4) & (lam < 2 + 1e-4))
  if target != "pos":
    assert ("ft_lambda_neg" in metrics) and 0 < float(metrics["ft_lambda_neg"]) < 1
  assert {score_stats.metric_name(s, t) for s in score_stats.STAT_NAMES
          for t in score_stats.STAGES} <= set(metrics)


@pytest.mark.parametrize("distribution,sep_alpha", [("uniform", True), ("beta", False)])
def test_shared_alpha_or_uniform_coefficients_are_element_wise_as_in_the_released_code(
    distribution, sep_alpha):
  config = _config(distribution=distribution, sep_alpha=sep_alpha, granularity="none")
  assert ft.effective_granularity(config) == "both"
  batch = _batch()
  out, _, _ = _apply(config, batch)
  lam = (np.asarray(out.anchor) - np.asarray(batch.positive[:, 0])) / np.asarray(
      batch.anchor - batch.positive[:, 0])
  assert np.ptp(lam) > 1e-3


@pytest.mark.parametrize("norm", ft.POSTMIX_NORMS)
def test_post_mix_normalisation_restores_unit_norm_where_asked(norm):
  out, _, _ = _apply(_config(postmix_norm=norm), _batch())
  pos_unit = np.allclose(np.linalg.norm(out.anchor, axis=-1), 1, atol=1e-5)
  neg_unit = np.allclose(np.linalg.norm(out.negatives, axis=-1), 1, atol=1e-5)
  assert pos_unit == (norm in ("pos", "both")) and neg_unit == (norm in ("neg", "both"))
  assert out.unit_norm == (norm == "both")


def test_interpolated_positives_and_bad_options_are_refused_or_honoured():
  batch = _batch()
  out, _, m = _apply(_config(extrapolate=False, target="pos"), batch)
  assert 0 < float(m["ft_lambda_pos"]) < 1
  two = batch.replace(positive=jnp.concatenate([batch.positive] * 2, axis=1))
  with pytest.raises(ValueError, match="one positive per anchor"):
    _apply(_config(), two)
  with pytest.raises(ValueError, match="ft.target"):
    _apply(_config(target="both"), batch)
  config = tiny("moco_ft", **{"ft.granularity": "rows", "ft.neg_alpha": 0.0})
  with pytest.raises(config_check.ConfigError) as err:
    config_check.validate(config, 1)
  assert "ft.granularity" in str(err.value) and "ft.neg_alpha" in str(err.value)


def test_score_statistics_are_the_tools_batch_aggregates():
  batch = _batch(b=7, k=9)
  stats = score_stats.score_distribution(batch)
  pos = np.sum(np.asarray(batch.anchor) * np.asarray(batch.positive[:, 0]), 1)
  neg = np.asarray(batch.anchor) @ np.asarray(batch.negatives).T
  np.testing.assert_allclose(stats["pos_mean"], pos.mean(), atol=1e-6)
  np.testing.assert_allclose(stats["pos_var"], pos.var(), atol=1e-6)
  np.testing.assert_allclose(stats["neg_mean"], neg.mean(1).mean(), atol=1e-6)
  np.testing.assert_allclose(stats["neg_var"], neg.var(1).mean(), atol=1e-6)
  # Extrapolation lowers the mean positive score (closed form: s - c with c >= 0).
  _, _, m = _apply(_config(), batch)
  assert float(m["score_pos_mean_post"]) <= float(m["score_pos_mean_pre"])
  assert float(m["score_pos_mean_pre"]) == pytest.approx(pos.mean(), abs=1e-6)
  # plots.py draws exactly these keys.
  assert plots.SCORE_STATS_PREFIX == score_stats.PREFIX
  assert [s for s, _ in plots.SCORE_STATS] == list(score_stats.STAT_NAMES)
  assert [s for s, _, _ in plots.SCORE_STAGES] == list(score_stats.STAGES)


def test_score_stats_png_draws_one_run_or_a_sweep_and_stays_out_of_curves(tmp_path):
  def series(shift):
    steps = np.array([1, 2, 3])
    return {score_stats.metric_name(s, t): (steps, steps * 0.1 + shift + (t == "post"))
            for s in score_stats.STAT_NAMES for t in score_stats.STAGES}

  one = plots.plot_score_stats([series(0.0)], str(tmp_path / "a.png"))
  sweep = plots.plot_score_stats([series(0.0), series(1.0)], str(tmp_path / "b.png"),
                                 labels=["m=0.9", "m=0.99"])
  assert os.path.getsize(one) > 0 and os.path.getsize(sweep) > 0
  assert plots.plot_score_stats([{"loss": (np.array([1]), np.array([1.0]))}],
                                str(tmp_path / "c.png")) is None
  assert not os.path.exists(tmp_path / "c.png")
  drawn = {k for _, keys, _ in plots.curve_panels({**series(0.0), "ft_lambda_pos": (
      np.array([1]), np.array([1.5]))}) for k in keys}
  assert drawn == {"ft_lambda_pos"}


# ---- the methods ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _moco_ft_one_device():
  return run(tiny("moco_ft", **{"ft.granularity": "both"}), 1, 2)


@pytest.mark.slow  # two MoCo + FT step compilations
def test_moco_ft_trains_on_four_devices_like_on_one():
  config = tiny("moco_ft", **{"ft.granularity": "both"})   # element-wise: sliced per device
  config_check.validate(config, 4)
  _, one, m1 = _moco_ft_one_device()
  _, four, m4 = run(config, 4, 2)
  assert all(np.isfinite(float(v)) for m in m4 for v in m.values())
  step = max(1.0, max_diff(one[0].params, one[1].params))
  assert max_diff(one[-1].params, four[-1].params) < 2e-5 * step
  assert max_diff(one[-1].banks, four[-1].banks) < 2e-5 * step
  for key in ("loss", "score_pos_mean_pre", "score_pos_mean_post", "score_neg_var_post"):
    np.testing.assert_allclose(m1[-1][key], m4[-1][key], rtol=1e-4, atol=1e-6)


def test_moco_ft_enqueues_the_original_keys_and_leaves_the_rest_of_the_queue():
  # The key encoder moves before the gradient step, so after one step MoCo and MoCo + FT hold
  # the same keys and the same queue; only the query encoder's step differs.
  _, with_ft, metrics = _moco_ft_one_device()
  plain = _plain_step("moco")
  assert max_diff(plain.banks, with_ft[1].banks) == 0
  assert max_diff(plain.params["key_encoder"], with_ft[1].params["key_encoder"]) == 0
  assert max_diff(plain.params["encoder"], with_ft[1].params["encoder"]) > 1e-7
  m = metrics[0]
  assert m["score_pos_mean_post"] < m["score_pos_mean_pre"]
  assert 1 < m["ft_lambda_pos"] < 2 and 0 < m["ft_lambda_neg"] < 1


def test_cmc_ft_transforms_the_bank_negatives_and_keeps_the_banks_original():
  _, with_ft, metrics = run(tiny("cmc_ft"), 1, 1)
  plain = _plain_step("cmc")
  assert max_diff(plain.params, with_ft[1].params) > 1e-7
  assert max_diff(plain.banks, with_ft[1].banks) == 0   # the step's original embeddings
  m = metrics[0]
  assert "ft_lambda_pos" not in m and 0 < m["ft_lambda_neg"] < 1   # the variant: negatives only
  assert m["score_pos_mean_post"] == pytest.approx(m["score_pos_mean_pre"], abs=1e-6)
  assert m["score_neg_var_post"] < m["score_neg_var_pre"]


@pytest.mark.slow
def test_cli_run_logs_the_score_statistics_and_draws_their_png(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  workdir = tmp_path / "w"
  r = subprocess.run(
      [sys.executable, "-m", "metaug_jax.main", "--config=configs/digits.py:moco_ft,tiny",
       f"--workdir={workdir}", "--config.num_train_steps=2", "--config.log_every_steps=1",
       "--config.eval.monitor_every_steps=0", "--config.eval.probe_after_training=False",
       "--config.eval.tsne_max_points=0", "--config.batch_size=16", "--config.moco.queue_size=64"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  logged = [rec for rec in records if "score_pos_mean_post" in rec]
  assert [rec["step"] for rec in logged] == [1, 2]
  for stat, stage in itertools.product(score_stats.STAT_NAMES, score_stats.STAGES):
    assert all(np.isfinite(rec[score_stats.metric_name(stat, stage)]) for rec in logged)
  assert os.path.getsize(workdir / plots.SCORE_STATS_PNG) > 0
  assert "score_stats.png" in r.stdout
