"""MetAug (Li et al., ICML 2022): meta feature augmentation, margin injection and OUCL, on the
feature-augmentation interface (docs/metaug.md §4.4).

One `train_step` is the iteration of docs/metaug.md §5.1, pmapped as one function:

  Phase A   the encoders step on L_total(theta, omega) with the generators fixed (gradients
            still flow *through* them into the embeddings);
  Phase B   the generators, a learned feature augmenter (augmenters/meta_generators.py), step
            on their own objective L_total(theta'(omega), omega), theta' a virtual SGD step
            of the encoders, by the meta-gradient strategy the config selects
            (metaug_jax/meta_gradient.py);
  banks     take Phase A's original embeddings.

L_total (docs/metaug.md §4.2) is built from ContrastBatches: each view's embedding is an
anchor the generators extend with a generated query (`extra_anchor`); every bank call gives
one ContrastBatch per direction (anchor = the call's query, positive = its own row of the
other view's bank, negatives = the K sampled rows, to_enqueue = the original embedding),
which passes through `Method.augmenter` (the identity here, Feature Transformation in
`metaug_ft`) and into the OUCL loss adapter (losses/adapters.py).

`config.method == "metaug_oucl_only"` trains the same encoders with O(S0) alone (the paper's
"only OUCL" row).
"""

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from metaug_jax import feature_aug, losses, memory_bank, meta_gradient, parallel
from metaug_jax.augmenters import feature_transform as ft_lib
from metaug_jax.augmenters import meta_generators
from metaug_jax.losses import adapters
from metaug_jax.methods import base, common, registry
from metaug_jax.methods.registry import PaperRow, table1


def margin_check(config) -> list:
  """A registry `check`: the authors' margin rule needs three views or more."""
  if config.metaug.margin_code_exact \
      and {"lab": 3, "lab2": 2}.get(config.data.views, config.data.num_views) < 3:
    return ["config.metaug.margin_code_exact=True needs >= 3 views (the authors' rule takes "
            "its thresholds from directions that avoid the augmented view; with 2 there are "
            "none); pass --config.metaug.margin_code_exact=False or 3 views (e.g. "
            "--config.data.views=lab or --config.data.num_views=3)."]
  return []


class StepInputs(NamedTuple):
  """What every objective evaluation of one step reads (`step_inputs`)."""
  views: tuple                       # this device's augmented views
  global_index: jax.Array            # (B_global,) bank rows of the whole batch
  step: jax.Array
  indices: Callable                  # phase -> the (B, K+1) indices of each bank call
  augmenter_keys: Callable           # phase -> one key per bank call, for the bank augmenter


def step_inputs(method: "MetAug", state: common.TrainState, batch: dict) -> StepInputs:
  """The step's views, and the negatives of each phase (`meta_gradient.PHASES`, drawn from
  the step's keys, docs/metaug.md, decision A13); the bank-row augmenter's keys come from
  `common.augmenter_key`, independent of the others."""
  keys = common.step_keys(state, ("augment",) + meta_gradient.PHASES)
  augmenter_key = common.augmenter_key(state)

  def augmenter_keys(phase):
    key = jax.random.fold_in(augmenter_key, meta_gradient.PHASES.index(phase))
    return jax.random.split(key, method.num_calls)

  return StepInputs(
      views=common.train_views(batch["image"], keys["augment"], method.config.data),
      global_index=parallel.gather_rows(batch["index"]), step=state.step,
      indices=lambda phase: method.draw_call_indices(keys[phase], batch["index"]),
      augmenter_keys=augmenter_keys)


@registry.register(
    "metaug", summary="MetAug: OUCL against memory banks with meta feature augmentation "
    "generators trained by a meta-gradient, and the margin-injected regulariser",
    check=margin_check,
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
  with_generators = True   # False: OUCL without MAGs whatever the method name (oucl_fa)
  # What OUCL does with d outside [0, 1], "keep" or "clip" (only a bank augmenter can cause it).
  score_range = "keep"

  def __init__(self, config, facts):
    super().__init__(config, facts)
    self.use_mag = self.with_generators and config.method != "metaug_oucl_only"
    if self.use_mag:
      self.generators = meta_generators.MetaFeatureGenerators(config, self.num_views)
      self.generator_tx = self.generators.optimizer()
    self.strategy = self.generators.strategy if self.use_mag else "phase_a_only"
    self.code_exact_banks = config.bank.schedule == "code_exact"

  def _init_extra(self, state, key, variables, sample_views):
    if not self.use_mag:
      return state
    outs = self.encoder.apply(variables, tuple(sample_views), train=False)
    params, stats = self.generators.init(
        key, meta_generators.view_batches(common.embeddings(outs)))
    return state.replace(
        params={**state.params, "mag": params},
        batch_stats={**state.batch_stats, "mag": stats},
        opt_state={**state.opt_state, "mag": self.generator_tx.init(params)})

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

  def oucl_options(self) -> dict:
    """`losses.oucl`'s keyword arguments from the `loss` section (docs/metaug.md §4.1)."""
    lc = self.config.loss
    return dict(form=lc.oucl_form, beta=lc.oucl_beta, gamma_pos=lc.oucl_gamma_pos,
                gamma_neg=lc.oucl_gamma_neg, margin=lc.oucl_margin, adaptive=lc.oucl_adaptive,
                scale=lc.oucl_scale)

  def margin_term(self, scores: Sequence[jax.Array]) -> jax.Array:
    """Margin-injected regulariser R (docs/metaug.md §4.3, decision A4) from the calls' d
    scores (B, P, K+1), in call order S0, S_1..S_V, S_all."""
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

  def call_queries(self, views: Sequence[feature_aug.ContrastBatch]) -> list:
    """The queries of each bank call: S0 the anchors; S_v the anchors with view v's replaced
    by its generated query (`extra_anchor`); S_all every generated query."""
    anchors = [b.anchor for b in views]
    if not self.use_mag:
      return [anchors]
    generated = [b.extra_anchor for b in views]
    single = [anchors[:v] + [generated[v]] + anchors[v + 1:] for v in range(self.num_views)]
    return [anchors] + single + [generated]

  def augment_call(self, batches, key, step):
    """`self.augmenter` on each direction's ContrastBatch of a call, and its metrics averaged
    over the directions."""
    out, metrics = [], []
    for batch, k in zip(batches, jax.random.split(key, len(batches))):
      augmented, _, m = feature_aug.apply_augmenter(self.augmenter, {}, {}, k, batch, step)
      out.append(augmented)
      metrics.append(m)
    averaged = {name: jnp.mean(jnp.stack([m[name] for m in metrics])) for name in metrics[0]}
    return tuple(out), averaged

  def oucl(self, call: memory_bank.BankCall, batches) -> adapters.OuclResult:
    """OUCL of one bank call's directions as they are, with this method's options."""
    return adapters.oucl(batches, scorer=call.scorer, score_range=self.score_range,
                         **self.oucl_options())

  def call_result(self, call: memory_bank.BankCall, batches, key, step):
    """(OUCL of one bank call's directions after `self.augmenter`, the augmenter's metrics)."""
    batches, metrics = self.augment_call(batches, key, step)
    return self.oucl(call, batches), metrics

  def total_loss(self, views, banks, inputs: StepInputs, phase: str):
    """L_total = O(S0) + l_aug [sum_v O(S_v) + O(S_all)] + l_mi R (docs/metaug.md §4.2).

    Args:
      views: the V views' ContrastBatches (anchor = to_enqueue = z_v; extra_anchor = a_v
        with the generators).
      banks: (V, N, D); inputs: the step's inputs; phase: whose negatives the calls use.

    Returns:
      (loss, banks after the calls, metrics); the score statistics are those of the d the
      loss saw (S0 and, prefixed aug_, S_all).
    """
    mc = self.config.metaug
    originals = [b.to_enqueue for b in views]
    results, metrics = [], {}
    for c, (queries, indices, key) in enumerate(zip(
        self.call_queries(views), inputs.indices(phase), inputs.augmenter_keys(phase))):
      call = memory_bank.BankCall(banks, indices)
      result, augmenter_metrics = self.call_result(
          call, call.contrast_batches(queries, originals), key, inputs.step)
      results.append(result)
      if c == 0:
        metrics.update(augmenter_metrics)
        if self.code_exact_banks:
          # The authors update the banks inside the S0 call, before S1..S4 are scored (A6).
          banks = memory_bank.update(banks, inputs.global_index,
                                     [parallel.gather_rows(f) for f in originals],
                                     self.config.bank.momentum)
    terms = [jnp.mean(r.loss) for r in results]
    scores = [r.scores for r in results]
    metrics.update({"oucl": terms[0], **common.score_stats(*memory_bank.split_scores(scores[0]))})
    loss = terms[0]
    if self.use_mag:
      aug = sum(terms[1:])
      margin = self.margin_term(scores)
      loss = loss + mc.lambda_aug * aug + mc.lambda_mi * margin
      metrics.update({"oucl_aug": aug, "margin": margin,
                      **common.score_stats(*memory_bank.split_scores(scores[-1]),
                                           prefix="aug_")})
    if self.score_range != "keep" or not isinstance(self.augmenter, feature_aug.Identity):
      metrics["oucl_scores_out_of_range"] = results[0].out_of_range
    metrics["loss_total"] = loss
    return loss, banks, metrics

  def objective(self, state, inputs: StepInputs) -> meta_gradient.Objective:
    """The step's L_total(theta, omega) = head(encode(theta), omega) (docs/metaug.md §6.4)."""

    def encode(theta, update_stats):
      """Train-mode encoders: (V embeddings, BN statistics); update_stats=False keeps the old
      statistics (virtual forwards, docs/metaug.md, decision A10)."""
      outs, stats = common.apply_encoder(self.encoder, theta, state.batch_stats["encoder"],
                                         inputs.views, update_stats=update_stats)
      return tuple(common.embeddings(outs)), stats

    def head(z, omega, banks, phase, update_stats):
      """The generators, the bank calls and the losses, from the V embeddings."""
      views = meta_generators.view_batches(z)
      generator_stats = state.batch_stats.get("mag")
      if self.use_mag:
        views, new_stats, _ = self.generators.apply(omega, generator_stats, None, views,
                                                    inputs.step)
        generator_stats = new_stats if update_stats else generator_stats
      loss, banks, metrics = self.total_loss(views, banks, inputs, phase)
      return loss, meta_gradient.HeadAux(generator_stats, banks, metrics, views)

    return meta_gradient.Objective(encode, head)

  # ---- the step (docs/metaug.md §5.1) ---------------------------------------------------------
  def train_step(self, state, batch):
    mc = self.config.metaug
    inputs = step_inputs(self, state, batch)
    objective = self.objective(state, inputs)
    theta, omega = state.params["encoder"], state.params.get("mag")

    # Phase A: the encoders step on L_total(theta, omega), the generators fixed. The fused
    # strategies reuse this phase for the meta-gradient (virtual step from the current theta).
    meta = None
    if self.strategy == "fused_reverse":
      phase_a, meta = meta_gradient.fused_reverse(objective, theta, omega, state.banks,
                                                  mc.inner_lr)
    elif self.strategy == "fused_forward_over_reverse":
      lin = meta_gradient.linearize(objective, theta, omega, state.banks, "phase_a",
                                    update_stats=True)
      phase_a = meta_gradient.PhaseA(lin.grad, lin.encoder_stats, lin.aux, lin)
    else:
      phase_a = meta_gradient.phase_a(objective, theta, omega, state.banks)
    theta_a, encoder_opt, update_norm = self._apply_encoder_update(state, phase_a.grad)
    metrics = {**phase_a.aux.metrics, "grad_norm": common.global_norm(phase_a.grad),
               "update_norm": update_norm}
    params, stats = {"encoder": theta_a}, {"encoder": phase_a.encoder_stats}
    opt_state = {"encoder": encoder_opt}
    banks = phase_a.banks

    # Phase B: the generators step on their own objective F(omega) = L_total(theta'(omega),
    # omega); the legacy step then takes a second, look-ahead encoder step (§5.3).
    if self.use_mag:
      if meta is None:
        meta = self.generators.outer_gradient(objective, theta, theta_a, omega, banks,
                                              phase_a)
      mag_grads, meta_metrics = meta_gradient.combine(meta)
      banks = meta.banks
      updates, opt_state["mag"] = self.generator_tx.update(mag_grads, state.opt_state["mag"],
                                                           omega)
      params["mag"] = optax.apply_updates(omega, updates)
      stats["mag"] = phase_a.aux.generator_stats
      metrics.update(meta_metrics)
      if self.strategy == "legacy":
        grads, banks, lookahead_metrics = meta_gradient.legacy_encoder_lookahead(
            objective, theta_a, params["mag"], banks, mc.inner_lr, mc.first_order)
        updates, opt_state["encoder"] = self.encoder_tx.update(grads, encoder_opt, theta_a)
        params["encoder"] = optax.apply_updates(theta_a, updates)
        metrics.update(lookahead_metrics)

    if not self.code_exact_banks:
      # The clean schedule (docs/metaug.md, decision A6): one update per step with Phase A's
      # original embeddings (to_enqueue), never generated ones.
      banks = memory_bank.update(state.banks, inputs.global_index,
                                 [parallel.gather_rows(b.to_enqueue) for b in phase_a.aux.views],
                                 self.config.bank.momentum)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state, banks=banks)
    return new_state, parallel.pmean(metrics)

  def features(self, state_params, state_stats, views):
    """Encoder features, plus the MAGs' fc2 activations on the embeddings (docs/metaug.md,
    decision A9 (b))."""
    feats = super().features(state_params, state_stats, views)
    if self.use_mag and "mag" in state_params:
      d = self.config.model.embedding_dim
      z = [feats["embedding"][:, i * d:(i + 1) * d] for i in range(self.num_views)]
      feats["mag_hidden"] = self.generators.hidden_features(state_params["mag"],
                                                            state_stats["mag"], z)
    return feats


def _metaug_ft_variant(config) -> None:
  """FT on the sampled bank negatives only: column 0, the positive, stays the anchor's row."""
  config.ft.target = "neg"


def _metaug_ft_check(config) -> list:
  problems = margin_check(config)
  if config.ft.target != "neg":
    problems.append(f"config.method='metaug_ft' transforms the sampled bank negatives only "
                    f"(the positive, column 0, stays the anchor's own bank row), got "
                    f"ft.target={config.ft.target!r}: pass --config.ft.target=neg (or use the "
                    f"config variant :metaug_ft).")
  return problems


@registry.register(
    "metaug_ft", summary="MetAug + Feature Transformation on every bank call's sampled "
    "negatives (Zhu et al. 2021)", section="ft", defaults=ft_lib.defaults, ranges=ft_lib.RANGES,
    variant=_metaug_ft_variant, check=_metaug_ft_check)
class MetAugFT(MetAug):
  """MetAug whose bank calls' per-direction ContrastBatches pass through Feature
  Transformation before OUCL (docs/feature_transformation.md §4): the K sampled rows are
  interpolated along K, column 0 is left alone, the banks take the original embeddings.
  `ft.oucl_scores` says what OUCL's d = (s + 1) / 2 does with mixed rows; the share of d
  outside [0, 1] is logged as `oucl_scores_out_of_range`."""

  def __init__(self, config, facts):
    super().__init__(config, facts)
    self.score_range = "clip" if config.ft.oucl_scores == "clip" else "keep"

  def build_augmenter(self):
    ft_config = self.config.ft
    if ft_config.oucl_scores == "renormalize" and ft_config.postmix_norm in ("none", "pos"):
      ft_config = ft_config.copy_and_resolve_references()
      ft_config.postmix_norm = "neg" if ft_config.postmix_norm == "none" else "both"
    return ft_lib.FeatureTransform(ft_config, global_batch=self.facts.global_batch)
