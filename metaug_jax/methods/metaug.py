"""MetAug (Li et al., ICML 2022): meta feature augmentation, margin injection and OUCL.

One `train_step` holds the whole iteration of docs/metaug.md §5, and is pmapped as one function:

  Phase A   encoders step on L_total(theta, omega) with the MAGs frozen (gradients still flow
            *through* the MAGs into the embeddings);
  Phase B   the MAGs step on the meta-objective L_total(theta'(omega), omega), where
            theta' = theta - alpha * grad_theta L_total(theta, omega) is a virtual SGD step
            whose dependence on omega is differentiated. By default
            (metaug.meta_gradient="forward_over_reverse") the second-order part is a jvp of
            the inner loss's omega-gradient along the outer gradient, through the encoder's
            linearisation; "reverse" is `jax.grad` of a function that itself calls
            `jax.grad`. Both give the same gradient (tested); the first keeps no encoder
            backward graph alive.

`config.method == "metaug_oucl_only"` trains the same encoders with O(S0) alone (the paper's
"only OUCL" row). The objective L_total (docs/metaug.md §4.2) is a pure function of
embeddings, so other feature augmenters can reuse `objective` with their own augmented
embeddings.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from metaug_jax import losses, memory_bank, parallel
from metaug_jax.methods import base, common, registry
from metaug_jax.methods.registry import PaperRow, table1
from metaug_jax.models import mag as mag_lib


def _tree_axpy(alpha, x, y):
  """y + alpha * x over two pytrees."""
  return jax.tree.map(lambda a, b: b + alpha * a, x, y)


@registry.register(
    "metaug", summary="MetAug: OUCL against memory banks with meta feature augmentation "
    "generators trained by a meta-gradient, and the margin-injected regulariser",
    paper_rows=(PaperRow("MetAug", {}, table1(44.51, 45.36, 85.41, 85.62, 87.87, 88.12,
                                              59.97, 61.06)),))
@registry.register(
    "metaug_oucl_only", summary="MetAug's ablation: the same encoders and banks trained with "
    "OUCL alone (no generators)",
    paper_rows=(PaperRow("MetAug (only OUCL)", {}, table1(42.02, 42.14, 84.09, 84.72, 85.98,
                                                          87.13, 59.21, 58.73)),))
class MetAug(base.Method):
  """Three-view (or V-view) CMC backbone with MAGs, margin-injected regulariser and OUCL."""

  uses_bank = True

  def __init__(self, config, facts):
    super().__init__(config, facts)
    self.use_mag = config.method == "metaug"
    mc = config.metaug
    if self.use_mag:
      self.mag = mag_lib.build_multiview_mag(config.model, self.num_views, axis_name="batch")
      self.mag_tx = common.sgd_with_coupled_decay(mc.mag_lr, mc.mag_momentum,
                                                  mc.mag_weight_decay)
    self.code_exact_banks = config.bank.schedule == "code_exact"

  def _init_extra(self, state, key, variables, sample_views):
    if not self.use_mag:
      return state
    outs = self.encoder.apply(variables, tuple(sample_views), train=False)
    mag_vars = self.mag.init(key, tuple(common.embeddings(outs)), train=False)
    return state.replace(
        params={**state.params, "mag": mag_vars["params"]},
        batch_stats={**state.batch_stats, "mag": mag_vars.get("batch_stats", {})},
        opt_state={**state.opt_state, "mag": self.mag_tx.init(mag_vars["params"])})

  # ---- the objective L_total (docs/metaug.md §4.2) -------------------------------------------
  @property
  def num_calls(self) -> int:
    """S0, then S_v with view v augmented for each v, then S_all: V + 2 bank calls."""
    return self.num_views + 2 if self.use_mag else 1

  def draw_call_indices(self, key, anchor_index) -> list:
    """Fresh (B, K+1) indices for each bank call of one objective evaluation (docs/metaug.md,
    decision A13)."""
    return [memory_bank.draw_indices(k, anchor_index, self.facts.global_batch,
                                     self.config.bank.num_negatives, self.facts.bank_size)
            for k in jax.random.split(key, self.num_calls)]

  def oucl(self, scores: jax.Array) -> jax.Array:
    """Mean OUCL over this device's anchors for one call's (B, P, K+1) scores (docs/metaug.md
    §4.1)."""
    lc = self.config.loss
    pos, neg = memory_bank.split_scores(scores)
    return jnp.mean(losses.oucl(pos, neg, form=lc.oucl_form, beta=lc.oucl_beta,
                                  gamma_pos=lc.oucl_gamma_pos, gamma_neg=lc.oucl_gamma_neg,
                                  margin=lc.oucl_margin, adaptive=lc.oucl_adaptive,
                                  scale=lc.oucl_scale))

  def margin_term(self, scores: Sequence[jax.Array]) -> jax.Array:
    """Margin-injected regulariser R (docs/metaug.md §4.3, decision A4) from the calls' scores."""
    mc = self.config.metaug
    dirs = memory_bank.directions(self.num_views)
    single = scores[1:1 + self.num_views]          # S_v: view v augmented
    aug_cols = []
    for v, s in enumerate(single):
      aug_cols.append(s[:, [d for d, (x, _) in enumerate(dirs) if x == v]])
    if mc.margin_code_exact:
      # util.py: thresholds from the directions of S_v that avoid view v, the others penalised.
      cols = [losses.code_exact_columns(dirs, v) for v in range(self.num_views)]
      thr_pos, thr_neg = memory_bank.split_scores(
          jnp.concatenate([s[:, list(t)] for s, (t, _) in zip(single, cols)], axis=1))
      pen = jnp.concatenate([s[:, list(p)] for s, (_, p) in zip(single, cols)], axis=1)
      pos_scale, detach = 1e-4, False
    else:
      # Paper semantics: thresholds from the original call S0, only augmented queries.
      thr_pos, thr_neg = memory_bank.split_scores(scores[0])
      if mc.margin_include_all_augmented:
        aug_cols.append(scores[-1])
      pen = jnp.concatenate(aug_cols, axis=1)
      pos_scale, detach = mc.margin_pos_scale, mc.margin_detach_thresholds
    sigma_pos, sigma_neg = losses.margin_thresholds(thr_pos, thr_neg, mc.margin_type)
    if detach:
      sigma_pos, sigma_neg = jax.lax.stop_gradient((sigma_pos, sigma_neg))
    aug_pos, aug_neg = memory_bank.split_scores(pen)
    return losses.margin_regularizer(aug_pos, aug_neg, sigma_pos, sigma_neg,
                                         pos_scale=pos_scale)

  def objective(self, z: Sequence[jax.Array], a: Optional[Sequence[jax.Array]],
                banks: jax.Array, indices: Sequence[jax.Array], global_index: jax.Array):
    """L_total = O(S0) + l_aug [sum_v O(S_v) + O(S_all)] + l_mi R (docs/metaug.md §4.2).

    Args:
      z: V original embeddings (B, D); a: V augmented embeddings or None (OUCL only).
      banks: (V, N, D); indices: one (B, K+1) array per call; global_index: (B_global,)
        bank rows of the whole batch (only used by the "code_exact" bank schedule).

    Returns:
      (loss, aux) with aux = (banks after this evaluation, metrics dict).
    """
    mc = self.config.metaug
    scores = [memory_bank.score_call(z, banks, indices[0])]
    if self.code_exact_banks:
      # The authors update the banks inside the S0 call, before S1..S4 are scored (A6).
      banks = memory_bank.update(banks, global_index, [parallel.gather_rows(f) for f in z],
                                 self.config.bank.momentum)
    terms = [self.oucl(scores[0])]
    pos0, neg0 = memory_bank.split_scores(scores[0])
    metrics = {"oucl": terms[0], **common.score_stats(pos0, neg0)}
    loss = terms[0]
    if a is not None:
      queries = [list(z[:v]) + [a[v]] + list(z[v + 1:]) for v in range(self.num_views)]
      queries.append(list(a))
      for q, idx in zip(queries, indices[1:]):
        scores.append(memory_bank.score_call(q, banks, idx))
        terms.append(self.oucl(scores[-1]))
      aug = sum(terms[1:])
      margin = self.margin_term(scores)
      loss = loss + mc.lambda_aug * aug + mc.lambda_mi * margin
      apos, aneg = memory_bank.split_scores(scores[-1])
      metrics.update({"oucl_aug": aug, "margin": margin,
                      **common.score_stats(apos, aneg, prefix="aug_")})
    metrics["loss_total"] = loss
    return loss, (banks, metrics)

  # ---- forward passes ------------------------------------------------------------------------
  def _augment(self, mag_params, mag_stats, z, update_stats: bool):
    if not self.use_mag:
      return None, mag_stats
    outs, stats = common.apply_encoder(self.mag, mag_params, mag_stats, tuple(z),
                                       update_stats=update_stats)
    return common.embeddings(outs), stats

  def _encode(self, enc_params, state, views, update_stats: bool):
    """Train-mode encoder forward: (V embeddings, encoder BN stats). With update_stats=False
    the running-stat updates are discarded (virtual forwards, docs/metaug.md, decision A10)."""
    outs, stats = common.apply_encoder(self.encoder, enc_params, state.batch_stats["encoder"],
                                       views, update_stats=update_stats)
    return tuple(common.embeddings(outs)), stats

  def _head(self, z, omega, mag_stats, banks, indices, global_index, update_stats: bool):
    """L_total from the V embeddings: the MAGs, the bank calls, OUCL and the margin term.

    Returns (loss, (MAG batch stats, banks after the calls, metrics)).
    """
    a, mag_stats = self._augment(omega, mag_stats, list(z), update_stats)
    loss, (banks, metrics) = self.objective(list(z), a, banks, indices, global_index)
    return loss, (mag_stats, banks, metrics)

  def _loss_at(self, enc_params, mag_params, state, views, banks, indices, global_index):
    """L_total at given (possibly virtual) parameters: BN on batch statistics, none kept."""
    z, _ = self._encode(enc_params, state, views, update_stats=False)
    loss, (_, banks, metrics) = self._head(z, mag_params, state.batch_stats.get("mag"), banks,
                                           indices, global_index, update_stats=False)
    return loss, (banks, metrics)

  def _inner_gradient(self, inner_loss, params):
    """pmean'd grad of an inner loss, kept differentiable unless metaug.first_order.

    `inner_loss(params) -> (loss, (banks, metrics))`; returns (gradient, banks after it).
    """
    g, (banks, _) = jax.grad(inner_loss, has_aux=True)(params)
    g = parallel.pmean(g)
    if self.config.metaug.first_order:
      g = jax.lax.stop_gradient(g)
    return g, banks

  # ---- the step ------------------------------------------------------------------------------
  def train_step(self, state, batch):
    cfg = self.config
    keys = common.step_keys(state, ("augment", "phase_a", "inner", "outer", "inner2", "outer2"))
    views = common.train_views(batch["image"], keys["augment"], cfg.data)
    global_index = parallel.gather_rows(batch["index"])
    draw = lambda name: self.draw_call_indices(keys[name], batch["index"])
    mag_params = state.params.get("mag")

    # Phase A: encoders, MAGs frozen (docs/metaug.md §5.1). Running BN statistics are committed
    # here.
    def loss_a(enc_params, omega):
      z, enc_stats = self._encode(enc_params, state, views, update_stats=True)
      loss, (mag_stats, banks, metrics) = self._head(
          z, omega, state.batch_stats.get("mag"), state.banks, draw("phase_a"), global_index,
          update_stats=True)
      return loss, (enc_stats, mag_stats, list(z), banks, metrics)

    fused = (self.use_mag and cfg.metaug.algorithm == "paper"
             and cfg.metaug.virtual_step_from == "current")
    by_jvp = (self.use_mag and cfg.metaug.algorithm == "paper"
              and cfg.metaug.meta_gradient == "forward_over_reverse")
    fused_double_backward = fused and not by_jvp
    if fused_double_backward:
      enc_grads, (enc_stats, mag_stats, z, banks, metrics), mag_grads, meta_metrics, banks = (
          self._fused_grads(state, views, loss_a, draw, global_index))
      metrics.update(meta_metrics)
    elif by_jvp:
      # Same gradient as loss_a's, through a linearised encoder whose linear map the fused
      # meta-gradient reuses (no second encoder forward).
      enc_grads, z, z_lin, head_a, (enc_stats, mag_stats, banks, metrics) = (
          self.linearized_encoder_gradient(state, views, state.params["encoder"], state.banks,
                                           draw("phase_a"), global_index, update_stats=True))
    else:
      (_, (enc_stats, mag_stats, z, banks, metrics)), enc_grads = jax.value_and_grad(
          loss_a, has_aux=True)(state.params["encoder"], mag_params)
      enc_grads = parallel.pmean(enc_grads)
    enc_params, enc_opt, update_norm = self._apply_encoder_update(state, enc_grads)
    metrics.update(grad_norm=common.global_norm(enc_grads), update_norm=update_norm)
    new_params = {"encoder": enc_params}
    new_stats = {"encoder": enc_stats}
    new_opt = {"encoder": enc_opt}
    state_a = state.replace(params={**state.params, **new_params}, banks=banks)

    if self.use_mag:
      if fused_double_backward:
        pass  # MAG gradients came with the encoder gradients
      elif fused:
        # Virtual step from the current theta: Phase A's gradient is the inner gradient.
        mag_grads, meta_metrics, banks = self._meta_grads_by_jvp(
            state, views, enc_grads, z, z_lin, head_a, banks, draw("outer"), global_index)
        metrics.update(meta_metrics)
      elif cfg.metaug.algorithm == "paper":
        mag_grads, meta_metrics, banks = self.paper_meta_gradient(state_a, views, draw,
                                                                  global_index)
        metrics.update(meta_metrics)
      else:
        mag_grads, meta_metrics, banks = self._legacy_mag_grads(state_a, views, draw,
                                                                global_index)
        metrics.update(meta_metrics)
      updates, mag_opt = self.mag_tx.update(mag_grads, state.opt_state["mag"], mag_params)
      new_params["mag"] = optax.apply_updates(mag_params, updates)
      new_stats["mag"] = mag_stats
      new_opt["mag"] = mag_opt
      if cfg.metaug.algorithm == "legacy":
        state_b = state_a.replace(params={**state_a.params, "mag": new_params["mag"]},
                                  banks=banks)
        enc_grads2, banks, m3 = self._legacy_encoder_lookahead(state_b, views, draw,
                                                               global_index)
        updates, enc_opt = self.encoder_tx.update(enc_grads2, enc_opt, enc_params)
        new_params["encoder"] = optax.apply_updates(enc_params, updates)
        new_opt["encoder"] = enc_opt
        metrics.update(m3)

    if not self.code_exact_banks:
      # The clean schedule (docs/metaug.md, decision A6): one update per step with the Phase-A
      # embeddings.
      banks = memory_bank.update(state.banks, global_index,
                                 [parallel.gather_rows(f) for f in z], cfg.bank.momentum)
    new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats,
                              opt_state=new_opt, banks=banks)
    return new_state, parallel.pmean(metrics)

  def meta_objective(self, state, views, inner_idx, outer_idx, global_index):
    """outer(omega_inner, omega_direct) = L_total(theta'(omega_inner), omega_direct)
    (docs/metaug.md §5.1).

    theta'(w) = theta - alpha * grad_theta L_total(theta, w) is the virtual SGD step, kept
    differentiable (no stop-gradient unless metaug.first_order). At (omega, omega) this is the
    paper's meta-objective; its gradient w.r.t. the first argument is the second-order path,
    w.r.t. the second the direct path, and their sum the full meta-gradient.
    """
    mc = self.config.metaug
    theta = state.params["encoder"]

    def outer(omega_inner, omega_direct):
      g, banks = self._inner_gradient(
          lambda t: self._loss_at(t, omega_inner, state, views, state.banks, inner_idx,
                                  global_index), theta)
      theta_virtual = _tree_axpy(-mc.inner_lr, g, theta)
      return self._loss_at(theta_virtual, omega_direct, state, views, banks, outer_idx,
                           global_index)

    return outer

  def _fused_grads(self, state, views, loss_a, draw, global_index):
    """Phase A and the meta-gradient in one double backward (metaug.virtual_step_from=current
    with metaug.meta_gradient=reverse; the forward-over-reverse default uses
    `_meta_grads_by_jvp` on Phase A's linearisation instead).

    The virtual step starts from the current theta instead of the updated one, so the inner
    gradient *is* Phase A's gradient: L_total(theta - alpha grad_theta L_total(theta, w), w'),
    the MAML form, costs one encoder forward/backward less than the paper-aligned order.
    """
    mc = self.config.metaug
    theta = state.params["encoder"]
    omega = state.params["mag"]
    outer_idx = draw("outer")

    def outer(omega_inner, omega_direct):
      (_, aux_a), g = jax.value_and_grad(loss_a, has_aux=True)(theta, omega_inner)
      g = parallel.pmean(g)
      g_virtual = jax.lax.stop_gradient(g) if mc.first_order else g
      theta_virtual = _tree_axpy(-mc.inner_lr, g_virtual, theta)
      loss, (banks, metrics) = self._loss_at(theta_virtual, omega_direct, state, views,
                                             aux_a[3], outer_idx, global_index)
      return loss, jax.lax.stop_gradient((g, aux_a, banks, metrics))

    (second, direct), (enc_grads, aux_a, banks, outer_metrics) = jax.grad(
        outer, argnums=(0, 1), has_aux=True)(omega, omega)
    mag_grads, meta_metrics = self._combine(direct, second, outer_metrics)
    return enc_grads, aux_a, mag_grads, meta_metrics, banks

  def paper_meta_gradient(self, state, views, draw, global_index):
    """Phase B: the MAG gradient through a virtual step from `state`'s encoder
    (docs/metaug.md §5.1, Algorithm 1). `draw(name)` gives the "inner" and "outer" calls'
    negatives.

    Returns (MAG gradient, metrics, banks after the outer call).
    """
    if self.config.metaug.meta_gradient == "forward_over_reverse":
      g, z, z_lin, head, (_, _, banks, _) = self.linearized_encoder_gradient(
          state, views, state.params["encoder"], state.banks, draw("inner"), global_index,
          update_stats=False)
      return self._meta_grads_by_jvp(state, views, g, z, z_lin, head, banks, draw("outer"),
                                     global_index)
    outer = self.meta_objective(state, views, draw("inner"), draw("outer"), global_index)
    omega = state.params["mag"]
    (second, direct), (banks, outer_metrics) = jax.grad(outer, argnums=(0, 1), has_aux=True)(
        omega, omega)
    return self._combine(direct, second, outer_metrics) + (banks,)

  def linearized_encoder_gradient(self, state, views, theta, banks, indices, global_index,
                                  update_stats: bool):
    """pmean grad_theta L_total(theta, omega) through a linearised encoder.

    The encoder is linearised once (jax.linearize: one forward, residuals kept); its transpose
    gives the gradient, and the same linear map later pushes a theta-direction to the
    embeddings for the second-order term, without a second encoder forward.

    Returns (g, z, z_lin, head, (encoder stats, MAG stats, banks, metrics)): z the embeddings,
    z_lin the linear map theta-tangent -> z-tangent, head(z, omega) -> (loss, aux) the rest of
    L_total with this call's banks and negatives.
    """
    z, z_lin, enc_stats = jax.linearize(
        lambda t: self._encode(t, state, views, update_stats), theta, has_aux=True)
    mag_stats = state.batch_stats.get("mag")

    def head(zs, omega):
      return self._head(zs, omega, mag_stats, banks, indices, global_index, update_stats)

    (_, (new_mag_stats, new_banks, metrics)), z_bar = jax.value_and_grad(head, has_aux=True)(
        z, state.params["mag"])
    (g,) = jax.linear_transpose(z_lin, theta)(z_bar)
    return parallel.pmean(g), z, z_lin, head, (enc_stats, new_mag_stats, new_banks, metrics)

  def _meta_grads_by_jvp(self, state, views, g, z, z_lin, head, banks, outer_idx,
                         global_index):
    """The MAG gradient of L_total(theta - alpha g(omega), omega), forward-over-reverse.

    g = pmean grad_theta L_inner(theta, omega), with L_inner(theta, omega) =
    head(z(theta), omega), comes from `linearized_encoder_gradient` (its value only). With
    v = pmean grad_theta' L_total at theta' = theta - alpha g, the chain rule gives
    d/d omega = direct + second, and by the symmetry of mixed partials
      second = -alpha (d g / d omega)^T v = -alpha d/d omega <grad_theta L_inner, v>
             = -alpha J_z[grad_omega head(z, omega)] (J_theta z) v,
    i.e. the encoder's linear map applied to v (a forward-mode pass, nothing kept), then a
    jvp of the MAG-level omega-gradient. No encoder backward graph is built, kept or
    differentiated, unlike jax.grad of jax.grad (metaug.meta_gradient="reverse", same value,
    tested).
    """
    mc = self.config.metaug
    theta, omega = state.params["encoder"], state.params["mag"]
    theta_virtual = _tree_axpy(-mc.inner_lr, g, theta)
    (_, (banks, outer_metrics)), (v, direct) = jax.value_and_grad(
        lambda t, w: self._loss_at(t, w, state, views, banks, outer_idx, global_index),
        argnums=(0, 1), has_aux=True)(theta_virtual, omega)
    if mc.first_order:
      second = jax.tree.map(jnp.zeros_like, direct)
    else:
      z_dot = z_lin(parallel.pmean(v))
      omega_grad = lambda zs: jax.grad(lambda w: head(zs, w)[0])(omega)
      _, mixed = jax.jvp(omega_grad, (z,), (z_dot,))
      second = jax.tree.map(lambda m: -mc.inner_lr * m, mixed)
    return self._combine(direct, second, outer_metrics) + (banks,)

  @staticmethod
  def _combine(direct, second, outer_metrics):
    """pmean the two parts of the MAG gradient, sum them, and log their norms."""
    direct, second = parallel.pmean((direct, second))
    grads = jax.tree.map(jnp.add, direct, second)
    metrics = {"mag_grad_direct_norm": common.global_norm(direct),
               "mag_grad_second_order_norm": common.global_norm(second),
               "mag_grad_norm": common.global_norm(grads),
               "meta_loss": outer_metrics["loss_total"]}
    return grads, metrics

  def _legacy_mag_grads(self, state, views, draw, global_index):
    """The authors' earlier MAG step (docs/metaug.md §5.3, step 2): a virtual step of the MAGs' own
    parameters, differentiated through; same direct / second-order split as the paper step."""
    mc = self.config.metaug
    theta = state.params["encoder"]
    omega = state.params["mag"]
    inner_idx, outer_idx = draw("inner"), draw("outer")

    def outer(omega_first, omega_second):
      g, banks = self._inner_gradient(
          lambda w: self._loss_at(theta, w, state, views, state.banks, inner_idx, global_index),
          omega_second)
      omega_virtual = _tree_axpy(-mc.inner_lr, g, omega_first)   # omega - alpha g at (w, w)
      return self._loss_at(theta, omega_virtual, state, views, banks, outer_idx, global_index)

    (direct, second), (banks, outer_metrics) = jax.grad(outer, argnums=(0, 1), has_aux=True)(
        omega, omega)
    return self._combine(direct, second, outer_metrics) + (banks,)

  def _legacy_encoder_lookahead(self, state, views, draw, global_index):
    """Legacy step 3 (docs/metaug.md §5.3): a second encoder step on the look-ahead loss
    L_total(theta - alpha grad L_total(theta)), Hessian terms included; MAGs frozen."""
    mc = self.config.metaug
    omega = state.params["mag"]
    inner_idx, outer_idx = draw("inner2"), draw("outer2")

    def outer(theta):
      g, banks = self._inner_gradient(
          lambda t: self._loss_at(t, omega, state, views, state.banks, inner_idx, global_index),
          theta)
      return self._loss_at(_tree_axpy(-mc.inner_lr, g, theta), omega, state, views, banks,
                           outer_idx, global_index)

    grads, (banks, _) = jax.grad(outer, has_aux=True)(state.params["encoder"])
    grads = parallel.pmean(grads)
    return grads, banks, {"lookahead_grad_norm": common.global_norm(grads)}

  def features(self, state_params, state_stats, views):
    """Encoder features, plus the MAGs' fc2 activations on the embeddings (docs/metaug.md,
    decision A9 (b))."""
    feats = super().features(state_params, state_stats, views)
    if self.use_mag and "mag" in state_params:
      d = self.config.model.embedding_dim
      z = [feats["embedding"][:, i * d:(i + 1) * d] for i in range(self.num_views)]
      outs = self.mag.apply({"params": state_params["mag"], "batch_stats": state_stats["mag"]},
                            tuple(z), train=False)
      feats["mag_hidden"] = jnp.concatenate([o["hidden"] for o in outs], axis=-1)
    return feats
