"""MoCo v2 (He et al., CVPR 2020; Chen et al., arXiv 2003.04297): a momentum key encoder and
a queue of past keys as negatives.

Per step: the key encoder moves towards the query encoder (theta_k <- m theta_k + (1 - m)
theta_q, MoCo Eq. 2), encodes both views without gradient, and each view's query is
contrasted with the other view's key against the queue (InfoNCE, MoCo Eq. 1, temperature 0.2;
`loss.negatives` selects the debiased or hard-negative form). The loss is symmetrised over the
two views and both views' keys are enqueued, the form most CIFAR-scale reproductions use
(the paper's is one direction). The queue only ever receives keys, never augmented features.

BatchNorm: statistics are synchronised over every device in both encoders (one global batch),
so MoCo's shuffled BN, which hides a query's sub-batch from its key's, would change nothing
here and is not used.
"""

import jax
import jax.numpy as jnp
import ml_collections

from metaug_jax import ema, feature_aug, parallel, queue
from metaug_jax.losses import adapters
from metaug_jax.config_check import Range
from metaug_jax.methods import common, registry, siamese
from metaug_jax.methods.registry import PaperRow, table1


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.queue_size = 4096        # K negatives (the paper: 65536 on ImageNet)
  c.momentum = 0.99          # m of the key encoder (0.999 on ImageNet)
  c.temperature = 0.2        # MoCo v2
  c.symmetric = True         # both directions (q1 vs k2 and q2 vs k1), both keys enqueued
  return c


def queue_check(name: str):
  """A registry `check` for methods on MoCo's queue: two views, and room for a step's keys."""
  def check(config) -> list:
    problems = siamese.two_view_check(name)(config)
    keys_per_step = config.batch_size * (2 if config.moco.symmetric else 1)
    if config.moco.queue_size < keys_per_step:
      problems.append(f"config.moco.queue_size={config.moco.queue_size} is smaller than the "
                      f"{keys_per_step} keys enqueued per step; pass a larger queue or batch "
                      f"fewer images.")
    return problems
  return check


@registry.register(
    "moco", summary="MoCo v2: momentum key encoder, queue of negatives, InfoNCE (t = 0.2)",
    section="moco", defaults=defaults,
    ranges={"queue_size": Range(1, integer=True), "momentum": Range(0, 1, hi_open=True),
            "temperature": Range(0, lo_open=True)},
    variant=siamese.two_view_variant, check=queue_check("moco"),
    paper_rows=(PaperRow("MoCo", {}, table1(35.90, 41.37, 77.50, 79.73, 76.37, 79.30,
                                             51.04, 52.31)),
                # The baseline beside moco_ft's rows, from the same source (ResNet-50,
                # 200 epochs; docs/feature_transformation.md).
                PaperRow("MoCo v2", {}, {"imagenet1k": (67.5, None)},
                         source="FT (ICCV 2021), README of the released code")))
class MoCo(siamese.TwoViewMethod):
  """MoCo v2 with a shared two-view query encoder and its momentum copy."""

  def _init_extra(self, state, key, variables, sample_views):
    state = self.copy_of_encoder(state, "key_encoder")
    return state.replace(banks=queue.init_queue(key, int(self.config.moco.queue_size),
                                                int(self.config.model.embedding_dim)))

  def _infonce(self, batch: feature_aug.ContrastBatch):
    """Per-anchor InfoNCE of one direction's (augmented) ContrastBatch: the key is the
    positive, the queue the negatives (MoCo Eq. 1); also returns the scores the loss saw."""
    lc = self.config.loss
    return adapters.infonce(batch, self.config.moco.temperature, negatives=lc.negatives,
                            tau_plus=lc.tau_plus, beta=lc.hard_beta)

  def key_forward(self, state, views):
    """(key encoder params, its outputs without gradient, its batch stats): the momentum
    update from the current query encoder, then the keys (as MoCo's code does)."""
    key_params = ema.momentum_update(state.params["key_encoder"], state.params["encoder"],
                                     self.config.moco.momentum)
    key_outs, key_stats = common.apply_encoder(self.encoder, key_params,
                                               state.batch_stats["key_encoder"], views)
    return key_params, jax.tree.map(jax.lax.stop_gradient, key_outs), key_stats

  def train_step(self, state, batch):
    mc = self.config.moco
    views = self.views(state, batch)
    key_params, key_outs, key_stats = self.key_forward(state, views)
    k = [jax.lax.stop_gradient(e) for e in common.embeddings(key_outs)]
    pairs = ((0, 1), (1, 0)) if mc.symmetric else ((0, 1),)
    aug_keys = jax.random.split(common.augmenter_key(state), len(pairs))
    queue_keys = jax.lax.stop_gradient(state.banks.keys)

    def loss_fn(params):
      outs, stats = common.apply_encoder(self.encoder, params, state.batch_stats["encoder"],
                                         views)
      q = common.embeddings(outs)
      terms, enqueue, aug_metrics = [], [], {}
      for (i, j), key in zip(pairs, aug_keys):
        contrast = feature_aug.ContrastBatch(anchor=q[i], positive=k[j][:, None],
                                             negatives=queue_keys, to_enqueue=k[j])
        contrast, aug_metrics = self.augment(state, key, contrast)
        terms.append(self._infonce(contrast))
        enqueue.append(contrast.to_enqueue)
      loss = sum(jnp.mean(t[0]) for t in terms) / len(terms)
      return loss, (stats, (terms[0][1], enqueue, aug_metrics))

    (loss, (stats, ((pos, neg), enqueue, aug_metrics))), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params["encoder"])
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads)
    # Only the original keys (ContrastBatch.to_enqueue) reach the queue.
    enqueued = jnp.concatenate([parallel.gather_rows(e) for e in enqueue], axis=0)
    new_state = state.replace(
        step=state.step + 1,
        params={"encoder": params, "key_encoder": key_params},
        batch_stats={"encoder": stats, "key_encoder": key_stats},
        opt_state={"encoder": opt}, banks=queue.enqueue(state.banks, enqueued))
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads),
               "update_norm": update_norm, **common.score_stats(pos, neg), **aug_metrics}
    return new_state, parallel.pmean(metrics)
