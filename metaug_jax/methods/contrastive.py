"""The contrastive baselines: SimCLR (in-batch NT-Xent) and CMC (cross-view, memory banks)."""

import itertools

import jax
import jax.numpy as jnp

from metaug_jax import feature_aug, losses, memory_bank, parallel
from metaug_jax.losses import adapters
from metaug_jax.methods import base, common, registry
from metaug_jax.methods.registry import PaperRow, table1


def _shared_encoder(config) -> None:
  """One encoder for every view: views of one shape (RGB crops instead of Lab splits)."""
  if config.data.views in ("lab", "lab2"):
    config.data.views, config.data.num_views = "simclr", 2
  config.model.share_encoder = True


@registry.register(
    "simclr", summary="SimCLR: in-batch NT-Xent over every pair of views, one shared encoder",
    variant=_shared_encoder, paper_rows=(
        PaperRow("SimCLR", {}, table1(36.24, 39.83, 75.57, 77.15, 80.58, 80.07, 50.03, 49.82)),
        PaperRow("SimCLR + Debiased", {"loss.negatives": "debiased"},
                 table1(38.79, 40.26, 77.09, 78.39, 80.89, 80.93, 51.38, 51.09)),
        PaperRow("SimCLR + Hard", {"loss.negatives": "hard"},
                 table1(40.05, 41.23, 79.86, 80.20, 82.13, 82.76, 52.69, 53.13))))
class SimCLR(base.Method):
  """NT-Xent over every pair of views, negatives gathered from all devices (Chen et al. 2020)."""

  def train_step(self, state, batch):
    cfg = self.config
    keys = common.step_keys(state, ("augment",))
    views = common.train_views(batch["image"], keys["augment"], cfg.data)

    def loss_fn(params):
      outs, stats = common.apply_encoder(self.encoder, params, state.batch_stats["encoder"],
                                         views)
      z = common.embeddings(outs)
      pairs = list(itertools.combinations(range(self.num_views), 2))
      loss = sum(self._nt_xent(z[i], z[j]) for i, j in pairs) / len(pairs)
      return loss, (stats, None)

    new_state, _, _, metrics = self._encoder_step(state, loss_fn)
    return new_state, parallel.pmean(metrics)

  def _nt_xent(self, z1, z2):
    """Mean NT-Xent of one view pair (anchor z1, positive z2, the rest of the global batch as
    negatives), with `loss.negatives` plain, debiased or hard."""
    lc = self.config.loss
    return adapters.nt_xent(feature_aug.ContrastBatch(anchor=z1, positive=z2[:, None]),
                            lc.temperature, axis_name=parallel.AXIS, negatives=lc.negatives,
                            tau_plus=lc.tau_plus, beta=lc.hard_beta)


@registry.register(
    "cmc", summary="CMC: InfoNCE of each view against the other views' memory banks",
    paper_rows=(
        PaperRow("CMC", {}, table1(41.58, 40.11, 83.03, 85.06, 81.31, 83.28, 58.13, 56.72)),
        PaperRow("CMC + Debiased", {"loss.negatives": "debiased"},
                 table1(41.64, 41.36, 83.79, 84.20, 82.17, 83.72, 58.48, 57.16)),
        PaperRow("CMC + Hard", {"loss.negatives": "hard"},
                 table1(42.89, 42.01, 83.16, 85.15, 83.04, 86.22, 58.97, 59.13))))
class CMC(base.Method):
  """CMC (Tian et al. 2020): InfoNCE of each view's query against the other views' banks.

  Summed over the V(V-1) directed view pairs, K sampled negatives per call, banks updated once
  per step with the batch's (stop-gradient) embeddings. Each direction's (query, own row, K
  rows) is a ContrastBatch of the bank call (`memory_bank.BankCall`) passed through
  `self.augmenter` (the identity here; `cmc_ft` builds Feature Transformation) and into the
  InfoNCE loss adapter.
  """

  uses_bank = True

  def infonce(self, contrast: feature_aug.ContrastBatch):
    """(mean InfoNCE of one direction, the (pos, neg) dot products it saw), `loss.*`'s
    estimator."""
    lc = self.config.loss
    loss, scores = adapters.infonce(contrast, lc.temperature, negatives=lc.negatives,
                                    tau_plus=lc.tau_plus, beta=lc.hard_beta)
    return jnp.mean(loss), scores

  def direction_loss(self, state, key, contrast: feature_aug.ContrastBatch):
    """(mean InfoNCE, the (pos, neg) dot products it saw, metrics) of one direction's bank
    call after `self.augmenter`."""
    contrast, metrics = self.augment(state, key, contrast)
    return (*self.infonce(contrast), metrics)

  def train_step(self, state, batch):
    cfg = self.config
    keys = common.step_keys(state, ("augment", "negatives"))
    views = common.train_views(batch["image"], keys["augment"], cfg.data)
    indices = memory_bank.draw_indices(keys["negatives"], batch["index"],
                                       self.facts.global_batch, cfg.bank.num_negatives,
                                       self.facts.bank_size)
    call = memory_bank.BankCall(state.banks, indices)
    pairs = memory_bank.directions(self.num_views)
    aug_keys = jax.random.split(common.augmenter_key(state), len(pairs))

    def loss_fn(params):
      outs, stats = common.apply_encoder(self.encoder, params, state.batch_stats["encoder"],
                                         views)
      z = common.embeddings(outs)
      per_direction, seen, enqueue, aug_metrics = [], [], {}, []
      for (x, _), contrast, key in zip(pairs, call.contrast_batches(z, z), aug_keys):
        # The anchor's own row (column 0) is the positive, the K sampled rows the negatives.
        loss, scores, metrics = self.direction_loss(state, key, contrast)
        aug_metrics.append(metrics)
        per_direction.append(loss)
        seen.append(scores)
        enqueue[x] = contrast.to_enqueue
      # The augmenter's metrics, averaged over the directions.
      aug_metrics = jax.tree.map(lambda *m: sum(m) / len(m), *aug_metrics)
      return sum(per_direction), (stats, (enqueue, seen, aug_metrics))

    (loss, (stats, (enqueue, seen, aug_metrics))), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params["encoder"])
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads)
    # The banks take the encoder's original embeddings (to_enqueue), never augmented features.
    banks = memory_bank.update(state.banks, parallel.gather_rows(batch["index"]),
                               [parallel.gather_rows(enqueue[v]) for v in range(self.num_views)],
                               cfg.bank.momentum)
    # Score statistics of what the loss saw, as d = (cos + 1) / 2 (docs/contrastive_baselines.md
    # §9).
    pos = losses.score_from_cosine(jnp.stack([p for p, _ in seen], axis=1))
    neg = losses.score_from_cosine(jnp.concatenate([n for _, n in seen], axis=1))
    new_state = state.replace(step=state.step + 1, params={"encoder": params},
                              batch_stats={"encoder": stats}, opt_state={"encoder": opt},
                              banks=banks)
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads), "update_norm": update_norm,
               **common.score_stats(pos, neg), **aug_metrics}
    return new_state, parallel.pmean(metrics)
