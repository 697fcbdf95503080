"""Feature Transformation (Zhu, Zhao, Liu, Sun, Chen; ICCV 2021) as a `FeatureAugmenter`
(docs/feature_transformation.md).

Two parameter-free rewrites of what an InfoNCE loss sees, drawn afresh every step:
  * positive extrapolation ("harder positives"): q' = l q + (1 - l) k and k' = l k + (1 - l) q
    with l = 1 + u, u ~ Beta(a+, a+), so each end of the q-k chord is pushed away from the
    other; the gradient reaches the encoder through q' and through the (1 - l) q term of k';
  * negative interpolation ("diversified negatives"): n'_j = l n_j + (1 - l) n_pi(j) with
    l ~ Beta(a-, a-) and a fresh permutation pi of the K negatives, on the step's copy only.
Nothing is re-normalised by default, so scores may leave [-1, 1] (`unit_norm` is cleared), and
`to_enqueue` is never touched: the queue receives the original keys.

Defaults are the released training commands (target posneg, extrapolated positives, Beta
coefficients with a+ = 2, a- = 1.6, one scalar of each per step). Every option of the released
code is a field of the config section `ft` (`defaults()`, `RANGES`).
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections

from metaug_jax import feature_aug, parallel
from metaug_jax.augmenters import score_stats
from metaug_jax.config_check import Choice, Range
from metaug_jax.models.layers import l2_normalize

TARGETS = ("pos", "neg", "posneg")
DISTRIBUTIONS = ("beta", "uniform")
GRANULARITIES = ("none", "pos", "neg", "both")
POSTMIX_NORMS = ("none", "pos", "neg", "both")
OUCL_SCORES = ("keep", "clip", "renormalize")


def defaults() -> ml_collections.ConfigDict:
  """The `ft` config section: the released code's options at the released setting."""
  c = ml_collections.ConfigDict()
  c.target = "posneg"          # what is transformed: positives, negatives or both
  c.extrapolate = True         # positives: l = 1 + u (extrapolation); False: l = u (mixup)
  c.distribution = "beta"      # u ~ Beta(a, a), or "uniform" on (0, 1)
  c.sep_alpha = True           # separate Beta parameters for positives and negatives
  c.pos_alpha = 2.0            # a+ (with sep_alpha)
  c.neg_alpha = 1.6            # a- (with sep_alpha)
  c.alpha = 2.0                # the shared a without sep_alpha
  c.granularity = "none"       # element-wise coefficients: none, pos ([B, D]), neg ([K, D]), both
  c.postmix_norm = "none"      # L2-renormalise after mixing: none, pos, neg or both
  c.score_stats = True         # log the score statistics before and after the transformation
  # metaug_ft only: OUCL rescales dot products to d = (s + 1) / 2, in [0, 1] for unit vectors;
  # FT's mixed rows may leave it. "keep" the scores as they are, "clip" d to [0, 1], or
  # "renormalize" the mixed rows (as postmix_norm=neg) so that d stays in range.
  c.oucl_scores = "keep"
  return c


RANGES = {
    "target": Choice(TARGETS), "distribution": Choice(DISTRIBUTIONS),
    "pos_alpha": Range(0, lo_open=True), "neg_alpha": Range(0, lo_open=True),
    "alpha": Range(0, lo_open=True), "granularity": Choice(GRANULARITIES),
    "postmix_norm": Choice(POSTMIX_NORMS), "oucl_scores": Choice(OUCL_SCORES),
}


# ---- the pieces (pure) ---------------------------------------------------------------------


def effective_granularity(config) -> str:
  """The coefficient granularity the released code actually uses: `granularity` only applies
  to separate Beta coefficients; with a shared alpha or uniform coefficients both masks are
  element-wise."""
  if config.sep_alpha and config.distribution == "beta":
    return config.granularity
  return "both"


def alphas(config) -> tuple[float, float]:
  """(a+, a-): the separate parameters, or the shared one twice."""
  if config.sep_alpha:
    return float(config.pos_alpha), float(config.neg_alpha)
  return float(config.alpha), float(config.alpha)


def draw_unit(key: jax.Array, shape: tuple, distribution: str, alpha: float) -> jax.Array:
  """Mixing weights u in (0, 1): Beta(alpha, alpha) or uniform, float32 of `shape`."""
  if distribution == "beta":
    return jax.random.beta(key, alpha, alpha, shape, jnp.float32)
  if distribution == "uniform":
    return jax.random.uniform(key, shape, jnp.float32)
  raise ValueError(f"ft.distribution={distribution!r}; choose one of {DISTRIBUTIONS}")


def positive_coefficient(u: jax.Array, extrapolate: bool) -> jax.Array:
  """l+ from u: 1 + u in (1, 2) for extrapolation (harder positives), u itself for
  interpolation."""
  return 1.0 + u if extrapolate else u


def mix_positive(anchor: jax.Array, positive: jax.Array,
                 lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FT's positive transformation: (l q + (1 - l) k, l k + (1 - l) q).

  `lam` is a scalar or (B, D) element-wise. With q, k unit-norm, s = q . k and scalar l,
  c = 2 l (l - 1)(1 - s): q' . k' = s - c and |q'|^2 = |k'|^2 = 1 + c (tested). No
  stop-gradient on k': the (1 - l) q term carries the anchor's gradient, as in the released
  code.
  """
  chex.assert_equal_shape([anchor, positive])
  return (lam * anchor + (1.0 - lam) * positive, lam * positive + (1.0 - lam) * anchor)


def mix_negatives(negatives: jax.Array, lam: jax.Array, perm: jax.Array) -> jax.Array:
  """FT's negative transformation: n'_j = l n_j + (1 - l) n_perm(j), along the K axis.

  Args:
    negatives: (K, D) shared or (B, K, D) per-anchor negatives (no gradient).
    lam: a scalar or a (K, D) element-wise coefficient (shared by every anchor).
    perm: (K,) a permutation of the K negatives (shared by every anchor).
  """
  chex.assert_shape(perm, (negatives.shape[-2],))
  negatives = jax.lax.stop_gradient(negatives)
  return lam * negatives + (1.0 - lam) * jnp.take(negatives, perm, axis=-2)


# ---- the augmenter -------------------------------------------------------------------------


class FeatureTransform:
  """Feature Transformation as a parameter-free `feature_aug.FeatureAugmenter`.

  Args:
    config: the `ft` config section (`defaults()`).
    global_batch: the global batch size, when `apply` runs inside a pmapped step: element-wise
      positive coefficients are then drawn for the global batch and sliced, so a sample's
      coefficients do not depend on the device count. None: drawn for the local batch.
  """

  def __init__(self, config: ml_collections.ConfigDict, global_batch: Optional[int] = None):
    self.config = config
    self.global_batch = global_batch

  def init(self, key, sample):
    del key, sample
    return {}, {}

  def _positive_lambda(self, key, anchor):
    c = self.config
    if effective_granularity(c) in ("pos", "both"):
      b, d = anchor.shape
      rows = self.global_batch or b
      u = draw_unit(key, (rows, d), c.distribution, alphas(c)[0])
      if rows != b:
        u = parallel.local_rows(u, b)
    else:
      u = draw_unit(key, (), c.distribution, alphas(c)[0])
    return positive_coefficient(u, bool(c.extrapolate))

  def _negative_lambda(self, key, negatives):
    c = self.config
    shape = negatives.shape[-2:] if effective_granularity(c) in ("neg", "both") else ()
    return draw_unit(key, shape, c.distribution, alphas(c)[1])

  def apply(self, params, state, key, batch: feature_aug.ContrastBatch, step):
    """(transformed batch, state, metrics): the coefficients' means and, with `score_stats`,
    the score statistics before and after (augmenters/score_stats.py)."""
    del params, step
    c = self.config
    if c.target not in TARGETS:
      raise ValueError(f"ft.target={c.target!r}; choose one of {TARGETS}")
    pos_key, neg_key, perm_key = jax.random.split(key, 3)
    anchor, positive, negatives = batch.anchor, batch.positive, batch.negatives
    unit_norm, metrics = batch.unit_norm, {}
    if c.target in ("pos", "posneg"):
      if positive.shape[1] != 1:
        raise ValueError(f"ft.target={c.target!r} extrapolates one positive per anchor; this "
                         f"batch has {positive.shape[1]}")
      lam = self._positive_lambda(pos_key, anchor)
      anchor, k_hat = mix_positive(anchor, positive[:, 0], lam)
      if c.postmix_norm in ("pos", "both"):
        anchor, k_hat = l2_normalize(anchor), l2_normalize(k_hat)
      else:
        unit_norm = False
      positive = k_hat[:, None]
      metrics["ft_lambda_pos"] = jnp.mean(lam)
    if c.target in ("neg", "posneg") and negatives is not None:
      lam = self._negative_lambda(neg_key, negatives)
      perm = jax.random.permutation(perm_key, negatives.shape[-2])
      negatives = mix_negatives(negatives, lam, perm)
      if c.postmix_norm in ("neg", "both"):
        negatives = l2_normalize(negatives)
      else:
        unit_norm = False
      metrics["ft_lambda_neg"] = jnp.mean(lam)
    out = batch.replace(anchor=anchor, positive=positive, negatives=negatives,
                        unit_norm=unit_norm)
    if c.score_stats:
      metrics.update(score_stats.before_after(batch, out))
    return out, state, metrics
