"""MetAug on the feature-augmentation interface: the loss adapters against direct formulas, the
generators as a learned augmenter, and the meta-gradient strategy each config selects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import feature_aug, losses, memory_bank, meta_gradient, parallel
from metaug_jax.augmenters import meta_generators
from metaug_jax.losses import adapters

from test_baselines import max_diff, tiny


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
