"""Feature augmenters: pure rewrites of a `feature_aug.ContrastBatch` (docs/feature_augmentation.md).

  * `feature_transform.FeatureTransform`: Feature Transformation (Zhu et al., ICCV 2021),
    positive extrapolation and negative interpolation (docs/feature_transformation.md);
  * `feature_augmentation.FeatureAugmentation`: FA, the configurable feature-augmentation
    module (Zhang et al., arXiv 2410.12396): noise, dropout, mixing or a learned generator at
    a chosen placement, with its gradient-flow policy;
  * `meta_generators.MetaFeatureGenerators`: MetAug's meta feature augmentation generators, a
    learned augmenter with its own optimiser and outer objective (docs/metaug.md §4.4);
  * `score_stats`: the positive / negative score-distribution statistics of that paper's
    visualisation tool, before and after an augmenter.
"""

from metaug_jax.augmenters.feature_augmentation import FeatureAugmentation
from metaug_jax.augmenters.feature_transform import FeatureTransform
from metaug_jax.augmenters.meta_generators import MetaFeatureGenerators
from metaug_jax.augmenters.score_stats import score_distribution

__all__ = ["FeatureAugmentation", "FeatureTransform", "MetaFeatureGenerators", "score_distribution"]
