"""Feature augmentation (FA; Zhang et al., arXiv 2410.12396) on MoCo v2, SimCLR, BYOL,
SimSiam and the memory-bank methods: `moco_fa`, `simclr_fa`, `byol_fa`, `simsiam_fa`,
`cmc_fa` (CMC's InfoNCE) and `oucl_fa` (MetAug's OUCL without generators)
(docs/feature_augmentation.md §4).

Each is its plain method's step with an FA term (the `fa` config section,
augmenters/feature_augmentation.py):

  L = w_orig L_orig + w_FA mean_c L(copy c)  [+ similarity_weight x the generator's penalty]

L_orig is the plain method's loss, computed by the same functions; copy c is one draw of the
FA augmenter on every contrast direction's features at `fa.placement`, carried through what
follows the placement (the projector for backbone copies, the predictor for online copies
of the Siamese methods) and scored by the same loss. The bank methods apply FA to each bank
call's directions (query, own bank row, K sampled rows) at the projector output, the level the
banks hold. With `usage=extra_positive`,
w_orig = 1 and w_FA = `weight` (0 before `warmup_steps`); with `replace` or `extra_negative`
the FA term is the loss (w_orig = 0, w_FA = 1) once FA is on. So an identity FA (sigma = 0,
p = 0 or lambda = 1) with `replace` reproduces the plain method's loss and gradients (tested).

What follows a placement runs in train mode on the copies of every direction together (the
BatchNorm batch of the original forward), and its running statistics are discarded: only
the original forward updates them. Only original keys reach MoCo's queue. A learned generator
(op "learned") is trained by its own SGD in the same step.
"""

import jax
import jax.numpy as jnp
import optax

from metaug_jax import feature_aug, losses, parallel, queue
from metaug_jax.augmenters import feature_augmentation as fa_lib
from metaug_jax.augmenters import score_stats
from metaug_jax.methods import common, contrastive, metaug, moco, registry, siamese
from metaug_jax.methods import byol as byol_lib
from metaug_jax.methods import simsiam as simsiam_lib
from metaug_jax.models import encoders
from metaug_jax.models.layers import l2_normalize

# The two contrast directions of a two-view method: (anchor view, target view).
DIRECTIONS = ((0, 1), (1, 0))


def _check(name: str, family: str, has_predictor: bool, method_check):
  """The registry check: the plain method's rules, then the FA section's."""
  def check(config) -> list:
    return method_check(config) + fa_lib.problems(config, name, family, has_predictor)
  return check


def collapse_monitor(z: jax.Array) -> jax.Array:
  """Mean per-dimension std of the l2-normalised projections (SimSiam's Fig. 2 monitor; about
  1/sqrt(D) when healthy, 0 when collapsed)."""
  return jnp.mean(jnp.std(l2_normalize(z), axis=0))


def masked_score_stats(pos: jax.Array, neg: jax.Array, valid: jax.Array) -> dict:
  """score_stats.score_distribution's statistics over the valid negatives only (NT-Xent's
  in-batch scores, where each anchor's own column and its positive are not negatives)."""
  pos, neg = jax.lax.stop_gradient(pos), jax.lax.stop_gradient(neg)
  count = jnp.maximum(jnp.sum(valid, axis=1), 1)
  mean = jnp.sum(jnp.where(valid, neg, 0.0), axis=1) / count
  var = jnp.sum(jnp.where(valid, jnp.square(neg - mean[:, None]), 0.0), axis=1) / count
  return {"pos_mean": jnp.mean(pos), "pos_var": jnp.var(pos), "neg_mean": jnp.mean(mean),
          "neg_var": jnp.mean(var)}


def _stage(stats: dict, stage: str) -> dict:
  return {score_stats.metric_name(k, stage): v for k, v in stats.items()}


class FAMixin:
  """What every FA method shares: the augmenter, its generator's state and update, the FA
  weights, re-projection of backbone copies and the FA term over copies."""

  def build_augmenter(self):
    return fa_lib.FeatureAugmentation(self.config.fa, global_batch=self.facts.global_batch)

  @property
  def fa(self):
    return self.config.fa

  # ---- state -------------------------------------------------------------------------------

  def _init_augmenter(self, state, key, variables, sample_views):
    """params / opt_state["augmenter"]: the generator for the feature width at the placement
    (nothing without a learned op)."""
    if not self.augmenter.learned:
      return state
    width = int(self.config.model.embedding_dim)
    if self.fa.placement == "backbone":
      outs = jax.eval_shape(lambda: self.encoder.apply(variables, tuple(sample_views),
                                                       train=False))
      width = outs[0]["conv"].shape[-1]
    sample = feature_aug.ContrastBatch(anchor=jnp.zeros((2, width)),
                                       positive=jnp.zeros((2, 1, width)))
    params, _ = self.augmenter.init(jax.random.fold_in(key, 0x0FA), sample)
    return state.replace(
        params={**state.params, "augmenter": params},
        opt_state={**state.opt_state, "augmenter": self.augmenter.optimizer().init(params)})

  def _trainable(self, state, parts: tuple) -> dict:
    """The differentiated parts: `parts` and, with a learned op, the generator."""
    out = {part: state.params[part] for part in parts}
    if self.augmenter.learned:
      out["augmenter"] = state.params["augmenter"]
    return out

  def _augmenter_update(self, state, grads) -> tuple[dict, dict, dict]:
    """({"augmenter": params}, {"augmenter": opt_state}, metrics) after the generator's own
    step, or empty dicts without a generator."""
    if not self.augmenter.learned:
      return {}, {}, {}
    tx = self.augmenter.optimizer()
    updates, opt = tx.update(grads["augmenter"], state.opt_state["augmenter"],
                             state.params["augmenter"])
    params = optax.apply_updates(state.params["augmenter"], updates)
    return ({"augmenter": params}, {"augmenter": opt},
            {"fa_generator_grad_norm": common.global_norm(grads["augmenter"])})

  # ---- the FA term -------------------------------------------------------------------------

  def fa_weights(self, step) -> tuple[jax.Array, jax.Array]:
    """(w_orig, w_FA) at `step` (module docstring)."""
    on = (step >= self.fa.warmup_steps).astype(jnp.float32)
    if self.fa.usage == "extra_positive":
      return jnp.float32(1.0), self.fa.weight * on
    return 1.0 - on, on

  def penalty(self, fa_metrics: dict) -> jax.Array:
    """The generator's similarity penalty, weighted (0 without a generator)."""
    if not self.augmenter.learned:
      return jnp.float32(0.0)
    return self.fa.similarity_weight * fa_metrics[fa_lib.PENALTY]

  def reproject(self, params, stats, features: list, views: list) -> list:
    """Backbone features through the projector of the shared encoder `params` (the tail of the
    encoder, `project_only`), views concatenated in view order as in the original forward;
    returns each feature's output dict. The running statistics are discarded."""
    projector = encoders.build_encoder(self.config.model, axis_name=parallel.AXIS)
    order = sorted(range(len(features)), key=lambda n: views[n])
    x = jnp.concatenate([features[n] for n in order], axis=0)
    out, _ = projector.apply({"params": params["view_0"], "batch_stats": stats["view_0"]}, x,
                             train=True, project_only=True, mutable=["batch_stats"])
    rows = features[0].shape[0]
    parts = {n: {k: v[r * rows:(r + 1) * rows] for k, v in out.items()}
             for r, n in enumerate(order)}
    return [parts[n] for n in range(len(features))]

  def discrimination_tail(self, copies: list, originals: list, pairs, online, target) -> list:
    """What an InfoNCE / NT-Xent term sees of the copies (per direction (i, j) of `pairs`):
    projector copies as they are, the target copy as `target_copy` says; backbone copies
    re-projected, anchors by the `online` (params, batch stats) and positives by the `target`
    ones, in place of the originals' embeddings."""
    if self.fa.placement != "backbone":
      return self.projector_tail(copies)
    seen = list(originals)
    if self.fa.side in ("online", "both"):
      emb = self.reproject(*online, [c.anchor for c in copies], [i for i, _ in pairs])
      seen = [s.replace(anchor=e["embedding"]) for s, e in zip(seen, emb)]
    if self.fa.side in ("target", "both"):
      emb = self.reproject(*target, [c.positive[:, 0] for c in copies], [j for _, j in pairs])
      seen = [s.replace(positive=self.target_copy(e["embedding"])[:, None])
              for s, e in zip(seen, emb)]
    return seen

  def projector_tail(self, copies: list) -> list:
    """Copies made at the projector output, as the loss sees them: nothing follows the
    placement, the positive is a target copy (`target_copy`)."""
    return [c.replace(positive=self.target_copy(c.positive)) for c in copies]

  def target_copy(self, x: jax.Array) -> jax.Array:
    """A target-side copy as the loss sees it: a stop-gradient target under detach_output
    (after whatever followed the placement)."""
    return jax.lax.stop_gradient(x) if self.fa.grad_policy == "detach_output" else x

  def fa_term(self, aug_params, key, step, placed: list, tail, copy_loss):
    """(mean over copies of the FA loss, metrics averaged over copies and directions).

    Args:
      aug_params: the generator's parameters ({} without one).
      key: this step's augmenter key.
      step: the step, for the augmenter.
      placed: per contrast direction, the ContrastBatch of the features at the placement.
      tail: copies (per direction) -> what the loss sees (per direction).
      copy_loss: (what the loss sees, the copy's per-direction keys) -> (loss, metrics).
    """
    n, d = int(self.fa.num_copies), len(placed)
    keys = jax.random.split(key, n * d).reshape((n, d) + key.shape)

    def one_copy(copy_keys):
      copies, metrics = [], []
      for batch, k in zip(placed, copy_keys):
        out, _, m = feature_aug.apply_augmenter(self.augmenter, aug_params, {}, k, batch, step)
        copies.append(out)
        metrics.append(m)
      loss, more = copy_loss(tail(copies), copy_keys)
      per_direction = jax.tree.map(lambda *v: sum(v) / len(v), *metrics)
      return loss, {**per_direction, **more}

    losses_, metrics = jax.vmap(one_copy)(keys)
    return jnp.mean(losses_), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


# ---- instance discrimination -----------------------------------------------------------------


@registry.register(
    "moco_fa", summary="MoCo v2 + feature augmentation (the configurable FA module, `fa.*`)",
    section="fa", defaults=fa_lib.defaults, ranges=fa_lib.RANGES,
    variant=siamese.two_view_variant,
    check=_check("moco_fa", "discrimination", False, moco.queue_check("moco_fa")))
class MoCoFA(FAMixin, moco.MoCo):
  """MoCo v2 whose InfoNCE gets the FA term; the queue only ever takes the original keys."""

  def _init_extra(self, state, key, variables, sample_views):
    state = super()._init_extra(state, key, variables, sample_views)
    return self._init_augmenter(state, key, variables, sample_views)

  def train_step(self, state, batch):
    mc, fc = self.config.moco, self.fa
    views = self.views(state, batch)
    key_params, key_outs, key_stats = self.key_forward(state, views)
    k = common.embeddings(key_outs)
    pairs = DIRECTIONS if mc.symmetric else DIRECTIONS[:1]
    queue_keys = jax.lax.stop_gradient(state.banks.keys)
    w_orig, w_fa = self.fa_weights(state.step)

    def loss_fn(trainable):
      outs, stats = common.apply_encoder(self.encoder, trainable["encoder"],
                                         state.batch_stats["encoder"], views)
      q = common.embeddings(outs)
      originals = [feature_aug.ContrastBatch(anchor=q[i], positive=k[j][:, None],
                                             negatives=queue_keys, to_enqueue=k[j])
                   for i, j in pairs]
      terms = [self._infonce(b) for b in originals]
      loss_orig = sum(jnp.mean(t[0]) for t in terms) / len(terms)
      if fc.placement == "backbone":
        placed = [feature_aug.ContrastBatch(
            anchor=outs[i]["conv"], positive=key_outs[j]["conv"][:, None], unit_norm=False) for i, j in pairs]
      else:
        placed = originals

      def tail(copies):
        return self.discrimination_tail(
            copies, originals, pairs, (trainable["encoder"], state.batch_stats["encoder"]),
            (key_params, state.batch_stats["key_encoder"]))

      def copy_loss(seen, _):
        copy_terms = [self._infonce(b) for b in seen]
        metrics = {}
        if fc.score_stats:
          metrics = score_stats.before_after(originals[0], seen[0])
        return sum(jnp.mean(t[0]) for t in copy_terms) / len(copy_terms), metrics

      loss_fa, fa_metrics = self.fa_term(trainable.get("augmenter", {}),
                                         common.augmenter_key(state), state.step, placed, tail,
                                         copy_loss)
      loss = w_orig * loss_orig + w_fa * loss_fa + self.penalty(fa_metrics)
      aux = (terms[0][1], [b.to_enqueue for b in originals], fa_metrics, loss_orig, loss_fa,
             outs[0]["projection"])
      return loss, (stats, aux)

    (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        self._trainable(state, ("encoder",)))
    (pos, neg), enqueue, fa_metrics, loss_orig, loss_fa, z = aux
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads["encoder"])
    aug_params, aug_opt, aug_metrics = self._augmenter_update(state, grads)
    # Only the original keys (ContrastBatch.to_enqueue of the originals) reach the queue.
    enqueued = jnp.concatenate([parallel.gather_rows(e) for e in enqueue], axis=0)
    new_state = state.replace(
        step=state.step + 1,
        params={"encoder": params, "key_encoder": key_params, **aug_params},
        batch_stats={"encoder": stats, "key_encoder": key_stats},
        opt_state={"encoder": opt, **aug_opt}, banks=queue.enqueue(state.banks, enqueued))
    metrics = {"loss": loss, "loss_orig": loss_orig, "loss_fa": loss_fa, "fa_weight": w_fa,
               "grad_norm": common.global_norm(grads["encoder"]), "update_norm": update_norm,
               "projection_std_per_dim": collapse_monitor(z), **common.score_stats(pos, neg),
               **fa_metrics, **aug_metrics}
    return new_state, parallel.pmean(metrics)


@registry.register(
    "simclr_fa", summary="SimCLR + feature augmentation (the configurable FA module, `fa.*`)",
    section="fa", defaults=fa_lib.defaults, ranges=fa_lib.RANGES,
    variant=siamese.two_view_variant,
    check=_check("simclr_fa", "discrimination", False, siamese.two_view_check("simclr_fa")))
class SimCLRFA(FAMixin, contrastive.SimCLR):
  """SimCLR (two views) whose NT-Xent gets the FA term.

  Each anchor of the FA term (a copy or the original, by `fa.side`) is scored against its
  positive (a copy or the original) and against the original embeddings of the global batch
  as negatives, without its own column, its positive's column and, for inter_mix virtual
  instances, its partner's two columns; with `usage=extra_negative` also against copies of
  those embeddings (a copy counts where its original does).
  """

  def _init_extra(self, state, key, variables, sample_views):
    return self._init_augmenter(state, key, variables, sample_views)

  def _in_batch_masks(self, local_batch: int) -> tuple[jax.Array, jax.Array, int]:
    """(self columns (2B,), positive columns (2B,), global batch N) of the local anchors
    [z0; z1] among the gathered keys [all z0; all z1] (losses.contrastive.in_batch_pairs)."""
    n = self.facts.global_batch
    local = parallel.device_offset(local_batch) + jnp.arange(local_batch)
    return (jnp.concatenate([local, local + n]), jnp.concatenate([local + n, local]), n)

  def train_step(self, state, batch):
    cfg, fc = self.config, self.fa
    keys = common.step_keys(state, ("augment",))
    views = common.train_views(batch["image"], keys["augment"], cfg.data)
    w_orig, w_fa = self.fa_weights(state.step)

    def loss_fn(trainable):
      outs, stats = common.apply_encoder(self.encoder, trainable["encoder"],
                                         state.batch_stats["encoder"], views)
      z = common.embeddings(outs)
      loss_orig = self._nt_xent(z[0], z[1])
      b = z[0].shape[0]
      all_keys = jnp.concatenate([parallel.gather_rows(z[0]), parallel.gather_rows(z[1])])
      self_col, pos_col, n = self._in_batch_masks(b)
      cols = jnp.arange(2 * n)[None, :]
      valid = (cols != self_col[:, None]) & (cols != pos_col[:, None])
      originals = [feature_aug.ContrastBatch(anchor=z[i], positive=z[j][:, None],
                                             negatives=all_keys) for i, j in DIRECTIONS]
      if fc.placement == "backbone":
        placed = [feature_aug.ContrastBatch(anchor=outs[i]["conv"],
                                            positive=outs[j]["conv"][:, None], unit_norm=False)
                  for i, j in DIRECTIONS]
      else:
        placed = originals

      def tail(copies):
        online = (trainable["encoder"], state.batch_stats["encoder"])
        return self.discrimination_tail(copies, originals, DIRECTIONS, online, online)

      def plain_scores(seen):
        anchors = jnp.concatenate([s.anchor for s in seen])
        pos = jnp.sum(anchors * jnp.concatenate([s.positive[:, 0] for s in seen]), axis=-1)
        return pos, anchors @ all_keys.T, valid

      def scores(seen, copy_keys):
        pos, neg, ok = plain_scores(seen)
        if fc.op == "inter_mix" and fc.usage != "extra_negative":
          # A virtual instance mixes rows r and partner(r): neither is its negative.
          partner = jnp.concatenate([self.augmenter.partners(k, n)[self_col[:b] % n]
                                     for k in copy_keys])
          ok = ok & (cols != partner[:, None]) & (cols != partner[:, None] + n)
        if fc.usage == "extra_negative":
          extra, extra_ok = [], []
          for d, (s, k) in enumerate(zip(seen, copy_keys)):
            extra.append(s.anchor @ s.extra_negative[0].T)
            rows_ok = valid[d * b:(d + 1) * b]   # direction d's anchors are view d's rows
            if fc.op == "inter_mix":   # a mixed column counts where both its sources do
              rows_ok = rows_ok & rows_ok[:, self.augmenter.partners(k, 2 * n, True)]
            extra_ok.append(rows_ok)
          neg = jnp.concatenate([neg, jnp.concatenate(extra)], axis=1)
          ok = jnp.concatenate([ok, jnp.concatenate(extra_ok)], axis=1)
        return pos, neg, ok

      def infonce(pos, neg, ok):
        lc = cfg.loss
        return jnp.mean(losses.infonce_from_scores(pos, neg, lc.temperature, valid=ok,
                                                   negatives=lc.negatives,
                                                   tau_plus=lc.tau_plus, beta=lc.hard_beta))

      def copy_loss(seen, copy_keys):
        pos, neg, ok = scores(seen, copy_keys)
        metrics = {}
        if fc.score_stats:
          metrics = {**_stage(masked_score_stats(*plain_scores(originals)), "pre"),
                     **_stage(masked_score_stats(pos, neg, ok), "post")}
        return infonce(pos, neg, ok), metrics

      loss_fa, fa_metrics = self.fa_term(trainable.get("augmenter", {}),
                                         common.augmenter_key(state), state.step, placed, tail,
                                         copy_loss)
      loss = w_orig * loss_orig + w_fa * loss_fa + self.penalty(fa_metrics)
      return loss, (stats, (fa_metrics, loss_orig, loss_fa, outs[0]["projection"]))

    (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        self._trainable(state, ("encoder",)))
    fa_metrics, loss_orig, loss_fa, z = aux
    grads = parallel.pmean(grads)
    params, opt, update_norm = self._apply_encoder_update(state, grads["encoder"])
    aug_params, aug_opt, aug_metrics = self._augmenter_update(state, grads)
    new_state = state.replace(step=state.step + 1, params={"encoder": params, **aug_params},
                              batch_stats={"encoder": stats}, opt_state={"encoder": opt, **aug_opt})
    metrics = {"loss": loss, "loss_orig": loss_orig, "loss_fa": loss_fa, "fa_weight": w_fa,
               "grad_norm": common.global_norm(grads["encoder"]), "update_norm": update_norm,
               "projection_std_per_dim": collapse_monitor(z), **fa_metrics, **aug_metrics}
    return new_state, parallel.pmean(metrics)


# ---- instance similarity ---------------------------------------------------------------------


def _cosine(p: jax.Array, t: jax.Array) -> jax.Array:
  """(B,) cosine of prediction and target rows, at least float32; no stop-gradient (the
  caller decides, as the grad policy says)."""
  p = p.astype(jnp.promote_types(p.dtype, jnp.float32))
  t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
  return jnp.sum(l2_normalize(p) * l2_normalize(t), axis=-1)


class SiameseFA(FAMixin):
  """The FA step of the Siamese methods (BYOL, SimSiam): per direction i -> j the online
  prediction p_i regresses the target t_j; copies of z or h go through the predictor (and
  the projector) before they are scored. Subclasses give the target network, the pair loss,
  how the directions combine and the state update after the step."""

  def target_network(self, state, views):
    """(outputs, batch stats) of a separate target network, or (None, None) when the targets
    come from the online encoder."""
    return None, None

  def pair_loss(self, p: jax.Array, t: jax.Array) -> jax.Array:
    raise NotImplementedError

  def symmetrised(self, forward: jax.Array, backward: jax.Array) -> jax.Array:
    raise NotImplementedError

  def finish(self, state, params, stats, opt, target_stats, aux) -> tuple:
    """(new state, extra metrics) from the updated online parts."""
    raise NotImplementedError

  def _init_extra(self, state, key, variables, sample_views):
    state = super()._init_extra(state, key, variables, sample_views)
    return self._init_augmenter(state, key, variables, sample_views)

  def train_step(self, state, batch):
    fc = self.fa
    views = self.views(state, batch)
    target_outs, target_stats = self.target_network(state, views)
    w_orig, w_fa = self.fa_weights(state.step)

    def loss_fn(trainable):
      outs, enc_stats = common.apply_encoder(self.encoder, trainable["encoder"],
                                             state.batch_stats["encoder"], views)
      z = [o["projection"] for o in outs]
      p, pred_stats = self.predict(trainable["predictor"], state.batch_stats["predictor"],
                                   jnp.concatenate(z, axis=0))
      p = jnp.split(p, 2, axis=0)
      t_outs = outs if target_outs is None else target_outs
      t = [jax.lax.stop_gradient(o["projection"]) for o in t_outs]
      loss_orig = self.symmetrised(*(self.pair_loss(p[i], t[j]) for i, j in DIRECTIONS))
      # The online feature at the placement and the target-side feature at the same level;
      # the target side has no predictor, so there the prediction meets its target itself.
      level = {"backbone": "conv", "projector": "projection", "predictor": "projection"}
      online = [p[i] if fc.placement == "predictor" else outs[i][level[fc.placement]]
                for i, _ in DIRECTIONS]
      placed = [feature_aug.ContrastBatch(anchor=a, unit_norm=False,
                                          positive=t_outs[j][level[fc.placement]][:, None])
                for a, (_, j) in zip(online, DIRECTIONS)]

      def tail(copies):
        online, target = [p[i] for i, _ in DIRECTIONS], [t[j] for _, j in DIRECTIONS]
        if fc.side in ("online", "both"):
          online = [c.anchor for c in copies]
          if fc.placement == "backbone":
            online = [e["projection"] for e in self.reproject(
                trainable["encoder"], state.batch_stats["encoder"], online, [0, 1])]
          if fc.placement != "predictor":
            pred, _ = self.predict(trainable["predictor"], state.batch_stats["predictor"],
                                   jnp.concatenate(online, axis=0))
            online = jnp.split(pred, 2, axis=0)
        if fc.side in ("target", "both"):
          target = [c.positive[:, 0] for c in copies]
          if fc.placement == "backbone":
            params, stats = ((trainable["encoder"], state.batch_stats["encoder"])
                             if target_outs is None else
                             (state.params["target"], state.batch_stats["target"]))
            target = [e["projection"] for e in self.reproject(params, stats, target, [1, 0])]
          target = [self.target_copy(x) for x in target]
        return list(zip(online, target))

      def copy_loss(seen, _):
        loss = self.symmetrised(*(self.pair_loss(a, b) for a, b in seen))
        metrics = {}
        if fc.score_stats:   # the first direction's cosines, as BYOL's pos_mean
          for stage, (a, b) in (("pre", (p[0], t[1])), ("post", seen[0])):
            cos = jax.lax.stop_gradient(_cosine(a, b))
            metrics.update(_stage({"pos_mean": jnp.mean(cos), "pos_var": jnp.var(cos)}, stage))
        return loss, metrics

      loss_fa, fa_metrics = self.fa_term(trainable.get("augmenter", {}),
                                         common.augmenter_key(state), state.step, placed, tail,
                                         copy_loss)
      loss = w_orig * loss_orig + w_fa * loss_fa + self.penalty(fa_metrics)
      return loss, ((enc_stats, pred_stats), (z, p, t, fa_metrics, loss_orig, loss_fa))

    (loss, ((enc_stats, pred_stats), aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        self._trainable(state, ("encoder", "predictor")))
    z, _, _, fa_metrics, loss_orig, loss_fa = aux
    grads = parallel.pmean(grads)
    enc_params, enc_opt, update_norm = self._apply_encoder_update(state, grads["encoder"])
    pred_params, pred_opt = self._apply_part_update(state, "predictor", grads["predictor"])
    aug_params, aug_opt, aug_metrics = self._augmenter_update(state, grads)
    new_state, extra = self.finish(
        state, {"encoder": enc_params, "predictor": pred_params, **aug_params},
        {"encoder": enc_stats, "predictor": pred_stats},
        {"encoder": enc_opt, "predictor": pred_opt, **aug_opt}, target_stats, aux)
    online_grads = {"encoder": grads["encoder"], "predictor": grads["predictor"]}
    metrics = {"loss": loss, "loss_orig": loss_orig, "loss_fa": loss_fa, "fa_weight": w_fa,
               "grad_norm": common.global_norm(online_grads), "update_norm": update_norm,
               "projection_std_per_dim": collapse_monitor(z[0]), **fa_metrics, **aug_metrics,
               **extra}
    return new_state, parallel.pmean(metrics)


@registry.register(
    "byol_fa", summary="BYOL + feature augmentation (the configurable FA module, `fa.*`)",
    section="fa", defaults=fa_lib.defaults, ranges=fa_lib.RANGES,
    variant=siamese.two_view_variant,
    check=_check("byol_fa", "similarity", True, siamese.two_view_check("byol_fa")))
class BYOLFA(SiameseFA, byol_lib.BYOL):
  """BYOL whose regression loss gets the FA term; target copies at the backbone go through
  the target network's projector."""

  def target_network(self, state, views):
    outs, stats = common.apply_encoder(self.encoder, state.params["target"],
                                       state.batch_stats["target"], views)
    return [jax.tree.map(jax.lax.stop_gradient, o) for o in outs], stats

  def pair_loss(self, p, t):
    return jnp.mean(2.0 - 2.0 * _cosine(p, t))   # losses.byol_loss, gradient as given

  def symmetrised(self, forward, backward):
    return forward + backward

  def finish(self, state, params, stats, opt, target_stats, aux):
    _, p, t, *_ = aux
    new_state, decay = self.advance(state, params, stats, opt, target_stats)
    cos = _cosine(p[0], t[1])
    return new_state, {"target_decay": decay, "pos_mean": jnp.mean(cos), "pos_std": jnp.std(cos)}


@registry.register(
    "simsiam_fa", summary="SimSiam + feature augmentation (the configurable FA module, `fa.*`)",
    section="fa", defaults=fa_lib.defaults, ranges=fa_lib.RANGES,
    variant=siamese.two_view_variant,
    check=_check("simsiam_fa", "similarity", True, siamese.two_view_check("simsiam_fa")))
class SimSiamFA(SiameseFA, simsiam_lib.SimSiam):
  """SimSiam whose negative cosine gets the FA term; its targets are the online projections,
  so a target copy that keeps its gradient (grad_policy through) reaches the encoder."""

  def pair_loss(self, p, t):
    return -jnp.mean(_cosine(p, t))   # losses.negative_cosine, gradient as given

  def symmetrised(self, forward, backward):
    return 0.5 * (forward + backward)

  def finish(self, state, params, stats, opt, target_stats, aux):
    return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                         opt_state=opt), {}


# ---- memory banks: CMC's InfoNCE and MetAug's OUCL -------------------------------------------


def bank_problems(config, method: str) -> list:
  """What the bank methods add to the FA module's rules: their negatives are per-anchor bank
  rows of projector outputs, and their steps train no generator beside the encoders."""
  c, out = config.fa, []
  if c.placement != "projector":
    out.append(f"config.fa.placement={c.placement!r}: {method} applies FA to its bank calls, "
               f"whose rows are projector outputs: pass --config.fa.placement=projector.")
  if c.usage == "extra_negative":
    out.append(f"config.fa.usage='extra_negative' copies negatives shared by the anchors (a "
               f"queue, the batch); {method}'s are sampled per anchor from the banks: pass "
               f"--config.fa.usage=extra_positive or replace (or use moco_fa / simclr_fa).")
  if c.op == "learned":
    out.append(f"config.fa.op='learned': {method} trains no generator; MetAug's generators are "
               f"learned feature augmenters on these banks (--config.method=metaug), or pass "
               f"another --config.fa.op.")
  return out


def _bank_check(name: str, method_check=None):
  def check(config) -> list:
    own = method_check(config) if method_check else []
    return own + bank_problems(config, name) + fa_lib.problems(config, name, "discrimination",
                                                               False)
  return check


class BankFAMixin(FAMixin):
  """The FA term on one bank call: L = w_orig L(call) + w_FA mean_c L(copy c of the call),
  every direction of the call copied by one draw; rows the augmenter did not replace are the
  call's own (banks carry no gradient), and the banks receive the original embeddings."""

  def bank_fa_loss(self, step, key, batches: tuple, loss_of) -> tuple:
    """(weighted loss, loss_of's aux for the original call, metrics).

    Args:
      step: the step (FA weights and warm-up).
      key: this call's augmenter key.
      batches: the call's ContrastBatch per direction.
      loss_of: batches -> (scalar loss, aux).
    """
    w_orig, w_fa = self.fa_weights(step)
    loss_orig, aux = loss_of(batches)

    def copy_loss(seen, _):
      metrics = score_stats.before_after(batches[0], seen[0]) if self.fa.score_stats else {}
      return loss_of(tuple(seen))[0], metrics

    loss_fa, metrics = self.fa_term({}, key, step, list(batches), self.projector_tail,
                                    copy_loss)
    metrics = {**metrics, "loss_orig": loss_orig, "loss_fa": loss_fa, "fa_weight": w_fa}
    return w_orig * loss_orig + w_fa * loss_fa, aux, metrics


@registry.register(
    "cmc_fa", summary="CMC + feature augmentation on each bank call (the configurable FA "
    "module, `fa.*`, at the projector output)", section="fa", defaults=fa_lib.defaults,
    ranges=fa_lib.RANGES, check=_bank_check("cmc_fa"))
class CMCFA(BankFAMixin, contrastive.CMC):
  """CMC whose per-direction InfoNCE gets the FA term (loss_orig / loss_fa in the metrics are
  averaged over the directions, as CMC averages its augmenter's metrics)."""

  def direction_loss(self, state, key, contrast):
    return self.bank_fa_loss(state.step, key, (contrast,),
                             lambda batches: self.infonce(batches[0]))


@registry.register(
    "oucl_fa", summary="MetAug's OUCL (no generators) + feature augmentation on each bank call "
    "(the configurable FA module, `fa.*`, at the projector output)", section="fa",
    defaults=fa_lib.defaults, ranges=fa_lib.RANGES,
    check=_bank_check("oucl_fa", metaug.margin_check))
class OUCLFA(BankFAMixin, metaug.MetAug):
  """MetAug's only-OUCL encoders and banks whose OUCL gets the FA term: the hand-designed
  feature augmentations of the FA module in the place of MetAug's learned generators."""

  with_generators = False

  def call_result(self, call, batches, key, step):
    def loss_of(seen):
      result = self.oucl(call, seen)
      return jnp.mean(result.loss), result

    loss, result, metrics = self.bank_fa_loss(step, key, tuple(batches), loss_of)
    return result._replace(loss=loss), metrics
