"""Contrastive losses: NT-Xent, OUCL (docs/metaug.md §4.1) and the margin term (§4.3); the
InfoNCE family from scores (plain / debiased / hard negatives, for queues and bank rows) and
the losses without negatives of the baselines (SimSiam, BYOL, Barlow Twins). `adapters` gives
each as a function of `feature_aug.ContrastBatch`es, which is how the methods call them."""

from metaug_jax.losses.contrastive import nt_xent, score_from_cosine
from metaug_jax.losses.margin import (MARGIN_TYPES, code_exact_columns, margin_regularizer,
                                     margin_thresholds)
from metaug_jax.losses.negatives import NEGATIVE_MODES, infonce_from_scores, nt_xent_scores
from metaug_jax.losses.oucl import oucl
from metaug_jax.losses.similarity import (barlow_twins, byol_loss, negative_cosine,
                                          symmetric_negative_cosine)

__all__ = [
    "MARGIN_TYPES",
    "NEGATIVE_MODES",
    "barlow_twins",
    "byol_loss",
    "code_exact_columns",
    "infonce_from_scores",
    "margin_regularizer",
    "margin_thresholds",
    "negative_cosine",
    "nt_xent",
    "nt_xent_scores",
    "oucl",
    "score_from_cosine",
    "symmetric_negative_cosine",
]
