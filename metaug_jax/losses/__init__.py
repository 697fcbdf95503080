"""Contrastive losses: NT-Xent, CMC bank InfoNCE, OUCL (spec 4.1) and the margin term (4.3);
the InfoNCE family from scores (plain / debiased / hard negatives)."""

from metaug_jax.losses.contrastive import bank_infonce, bank_scores, nt_xent, score_from_cosine
from metaug_jax.losses.margin import MARGIN_TYPES, margin_regularizer, margin_thresholds
from metaug_jax.losses.negatives import NEGATIVE_MODES, infonce_from_scores, nt_xent_scores
from metaug_jax.losses.oucl import oucl

__all__ = [
    "MARGIN_TYPES",
    "NEGATIVE_MODES",
    "bank_infonce",
    "bank_scores",
    "infonce_from_scores",
    "margin_regularizer",
    "margin_thresholds",
    "nt_xent",
    "nt_xent_scores",
    "oucl",
    "score_from_cosine",
]
