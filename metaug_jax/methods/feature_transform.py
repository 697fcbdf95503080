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
"""

import jax
import jax.numpy as jnp

from metaug_jax import feature_aug, memory_bank, parallel
from metaug_jax.augmenters import feature_transform as ft_lib
from metaug_jax.methods import common, contrastive, moco, registry, siamese
from metaug_jax.methods.registry import PaperRow

# The FT paper's ImageNet linear-probe top-1 (ResNet-50, 200 epochs, pooled backbone features,
# reported as the "conv" level here) from the README of the released code.
_FT_SOURCE = "FT (ICCV 2021), README of the released code"


def _moco_ft_check(config) -> list:
  problems = siamese.two_view_check("moco_ft")(config)
  keys_per_step = config.batch_size * (2 if config.moco.symmetric else 1)
  if config.moco.queue_size < keys_per_step:
    problems.append(f"config.moco.queue_size={config.moco.queue_size} is smaller than the "
                    f"{keys_per_step} keys enqueued per step; pass a larger queue or batch "
                    f"fewer images.")
  return problems


@registry.register(
    "moco_ft", summary="MoCo v2 + Feature Transformation: extrapolated positives, "
                       "interpolated queue negatives (Zhu et al. 2021)",
    section="ft", defaults=ft_lib.defaults, ranges=ft_lib.RANGES,
    variant=siamese.two_view_variant, check=_moco_ft_check,
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

  def train_step(self, state, batch):
    cfg = self.config
    keys = common.step_keys(state, ("augment", "negatives"))
    views = common.train_views(batch["image"], keys["augment"], cfg.data)
    indices = memory_bank.draw_indices(keys["negatives"], batch["index"],
                                       self.facts.global_batch, cfg.bank.num_negatives,
                                       self.facts.bank_size)
    rows = memory_bank.gather(state.banks, indices)
    pairs = memory_bank.directions(self.num_views)
    aug_keys = jax.random.split(common.augmenter_key(state), len(pairs))

    def loss_fn(params):
      outs, stats = common.apply_encoder(self.encoder, params, state.batch_stats["encoder"],
                                         views)
      z = common.embeddings(outs)
      per_direction, aug_metrics = [], {}
      for (x, y), key in zip(pairs, aug_keys):
        contrast = feature_aug.ContrastBatch(anchor=z[x], positive=rows[y][:, :1],
                                             negatives=rows[y][:, 1:])
        contrast, aug_metrics = self.augment(state, key, contrast)
        call_rows = jnp.concatenate([contrast.positive, contrast.negatives], axis=1)
        per_direction.append(jnp.mean(self._bank_infonce(contrast.anchor, call_rows)))
      return sum(per_direction), (stats, (z, aug_metrics))

    (loss, (stats, (z, aug_metrics))), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["encoder"])
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads)
    # The banks take the encoder's original embeddings, never the transformed features.
    banks = memory_bank.update(state.banks, parallel.gather_rows(batch["index"]),
                               [parallel.gather_rows(f) for f in z], cfg.bank.momentum)
    pos, neg = memory_bank.split_scores(memory_bank.scores_from_rows(z, rows))
    new_state = state.replace(step=state.step + 1, params={"encoder": params},
                              batch_stats={"encoder": stats}, opt_state={"encoder": opt},
                              banks=banks)
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads), "update_norm": update_norm,
               **common.score_stats(pos, neg), **aug_metrics}
    return new_state, parallel.pmean(metrics)
