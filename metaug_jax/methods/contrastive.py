"""The contrastive baselines: SimCLR (in-batch NT-Xent) and CMC (cross-view, memory banks)."""

import itertools

import jax
import jax.numpy as jnp

from metaug_jax import losses, memory_bank, parallel
from metaug_jax.methods import base, common


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
      loss = sum(losses.nt_xent(z[i], z[j], cfg.loss.temperature, axis_name=parallel.AXIS)
                 for i, j in pairs) / len(pairs)
      return loss, stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["encoder"])
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads)
    new_state = state.replace(step=state.step + 1, params={"encoder": params},
                              batch_stats={"encoder": stats}, opt_state={"encoder": opt})
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads), "update_norm": update_norm}
    return new_state, parallel.pmean(metrics)


class CMC(base.Method):
  """CMC (Tian et al. 2020): InfoNCE of each view's query against the other views' banks.

  Summed over the V(V-1) directed view pairs, K sampled negatives per call, banks updated once
  per step with the batch's (stop-gradient) embeddings.
  """

  uses_bank = True

  def train_step(self, state, batch):
    cfg = self.config
    keys = common.step_keys(state, ("augment", "negatives"))
    views = common.train_views(batch["image"], keys["augment"], cfg.data)
    indices = memory_bank.draw_indices(keys["negatives"], batch["index"],
                                       self.facts.global_batch, cfg.bank.num_negatives,
                                       self.facts.bank_size)
    rows = memory_bank.gather(state.banks, indices)

    def loss_fn(params):
      outs, stats = common.apply_encoder(self.encoder, params, state.batch_stats["encoder"],
                                         views)
      z = common.embeddings(outs)
      per_direction = [jnp.mean(losses.bank_infonce(z[x], rows[y], cfg.loss.temperature))
                       for x, y in memory_bank.directions(self.num_views)]
      return sum(per_direction), (stats, z)

    (loss, (stats, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["encoder"])
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads)
    banks = memory_bank.update(state.banks, parallel.gather_rows(batch["index"]),
                               [parallel.gather_rows(f) for f in z], cfg.bank.momentum)
    pos, neg = memory_bank.split_scores(memory_bank.scores_from_rows(z, rows))
    new_state = state.replace(step=state.step + 1, params={"encoder": params},
                              batch_stats={"encoder": stats}, opt_state={"encoder": opt},
                              banks=banks)
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads), "update_norm": update_norm,
               **common.score_stats(pos, neg)}
    return new_state, parallel.pmean(metrics)
