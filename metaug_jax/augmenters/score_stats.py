"""The score-distribution statistics of Feature Transformation's visualisation tool
(Zhu et al., ICCV 2021; docs/feature_transformation.md, "Score distributions").

For every anchor of a step the tool records the raw (un-tempered) positive score, and the mean
and variance of its K negative scores; per step it keeps batch aggregates of these: the
batch mean and variance of the positive score, the batch mean of the negatives' mean and of
the negatives' variance. Here they are metrics a train step returns (O(B K) extra work), so
they land in metrics.jsonl and `plots.plot_score_stats` draws them against the step.
"""

import jax
import jax.numpy as jnp

from metaug_jax import feature_aug

STAT_NAMES = ("pos_mean", "pos_var", "neg_mean", "neg_var")
STAGES = ("pre", "post")
PREFIX = "score_"


def metric_name(stat: str, stage: str) -> str:
  """The metrics.jsonl key of one statistic at one stage: score_pos_mean_pre, ..."""
  return f"{PREFIX}{stat}_{stage}"


def score_distribution(batch: feature_aug.ContrastBatch) -> dict:
  """{pos_mean, pos_var, neg_mean, neg_var} of one ContrastBatch, without gradient.

  pos_mean / pos_var: batch mean / variance of every anchor . positive dot product;
  neg_mean / neg_var: batch mean of each anchor's mean / variance over its negatives (shared
  or per-anchor, extra negatives included). A batch without negatives gives only the first two.
  """
  batch = jax.lax.stop_gradient(batch)
  pos = feature_aug.positive_scores(batch).astype(jnp.float32)
  out = {"pos_mean": jnp.mean(pos), "pos_var": jnp.var(pos)}
  neg = feature_aug.negative_scores(batch)
  if neg is not None:
    neg = neg.astype(jnp.float32)
    out["neg_mean"] = jnp.mean(jnp.mean(neg, axis=1))
    out["neg_var"] = jnp.mean(jnp.var(neg, axis=1))
  return out


def before_after(before: feature_aug.ContrastBatch, after: feature_aug.ContrastBatch) -> dict:
  """The statistics of the batch an augmenter received and of the one the loss sees, keyed
  as in metrics.jsonl (`metric_name`)."""
  out = {}
  for stage, batch in zip(STAGES, (before, after)):
    out.update({metric_name(k, stage): v for k, v in score_distribution(batch).items()})
  return out
