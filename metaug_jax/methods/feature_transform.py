"""Feature Transformation (Zhu et al., ICCV 2021) on the queue and memory-bank baselines
(docs/feature_transformation.md).

  * `moco_ft`: MoCo v2 with FT on each direction's (query, key, queue copy): the paper's
    setting. Only the original keys reach the queue.
  * `cmc_ft`: CMC with FT on each bank call's per-anchor rows: the query is extrapolated with
    its own bank row (column 0) when `ft.target` includes positives, and the K sampled rows
    are interpolated among themselves (a permutation along K; column 0 never mixes into
    them). The variant `:cmc_ft` transforms the negatives only. Banks receive the original
    embeddings.

Both read the shared `ft` section; `moco_ft` also reads `moco`, `cmc_ft` the `bank` section.
`metaug_ft`, FT on MetAug's bank calls, is defined with MetAug (methods/metaug.py).
"""

from metaug_jax.augmenters import feature_transform as ft_lib
from metaug_jax.methods import contrastive, moco, registry, siamese
from metaug_jax.methods.registry import PaperRow

# The FT paper's ImageNet linear-probe top-1 (ResNet-50, 200 epochs, pooled backbone features,
# reported as the "conv" level here) from the README of the released code.
_FT_SOURCE = "FT (ICCV 2021), README of the released code"


@registry.register(
    "moco_ft", summary="MoCo v2 + Feature Transformation: extrapolated positives, "
                       "interpolated queue negatives (Zhu et al. 2021)",
    section="ft", defaults=ft_lib.defaults, ranges=ft_lib.RANGES,
    variant=siamese.two_view_variant, check=moco.queue_check("moco_ft"),
    paper_rows=(PaperRow("MoCo v2 + FT", {}, {"imagenet1k": (69.6, None)}, source=_FT_SOURCE),
                PaperRow("MoCo + FT (ImageNet-100)", {}, {"imagenet100": (77.2, None)},
                         source=_FT_SOURCE)))
class MoCoFT(moco.MoCo):
  """MoCo v2 whose per-direction ContrastBatch goes through Feature Transformation."""

  def build_augmenter(self):
    return ft_lib.FeatureTransform(self.config.ft, global_batch=self.facts.global_batch)


def _cmc_ft_variant(config) -> None:
  """FT on the sampled bank negatives only (the positive, column 0, left as it is)."""
  config.ft.target = "neg"


@registry.register(
    "cmc_ft", summary="CMC + Feature Transformation on each bank call's per-anchor rows",
    section="ft", defaults=ft_lib.defaults, ranges=ft_lib.RANGES, variant=_cmc_ft_variant)
class CMCFT(contrastive.CMC):
  """CMC whose bank InfoNCE sees the FT-transformed (query, own row, K sampled rows)."""

  def build_augmenter(self):
    return ft_lib.FeatureTransform(self.config.ft, global_batch=self.facts.global_batch)
