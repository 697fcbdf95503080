"""Hierarchical augmentation invariance with expanded views (Zhang & Ma, CVPR 2022;
docs/hierarchical_augmentation.md) on SimSiam, BYOL and Barlow Twins.

Each image gives one view pair per exit s of a multi-exit backbone (add-one pipelines,
`data/hierarchical.py`); exit s's pair is pushed through stages 1..s only, its pooled features
are expanded with the embeddings of each view's colour-jitter parameters (exits in
`hai.embed_exits`) and go through exit s's own projector (and predictor). The loss is the sum
of one base-method loss per exit, L = sum_s L_s with equal weights (their Fig. 3c):
  simsiam_hai: L_s = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 (Chen & He 2021, Eq. 4);
  byol_hai:    L_s = |p1 - sg(z'2)|^2 + |p2 - sg(z'1)|^2 normalised (Grill et al. 2020,
               Eq. 2), the target an EMA of the backbone *and* the exits' projectors;
  barlow_hai:  L_s = scale * [sum_i (1 - C_ii)^2 + lambda sum_{i!=j} C_ij^2] (Zbontar et al.
               2021, Eq. 1; the supplement's scale 1/32 and lambda 3.9e-3).
Each exit's loss is its base method's loss adapter (losses/adapters.py) on that exit's
ContrastBatches, as in the plain simsiam, byol and barlow_twins steps (`exit_loss`).
The linear probe reads the ordinary backbone: the last exit's pooled feature.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metaug_jax import ema, feature_aug, parallel
from metaug_jax.config_check import Choice, Range
from metaug_jax.data import hierarchical as hai_data
from metaug_jax.losses import adapters
from metaug_jax.methods import base, common, registry, siamese
from metaug_jax.models import expanded_heads, heads, multi_exit
from metaug_jax.models.encoders import parse_dtype
from metaug_jax.models.layers import l2_normalize

SECTION = "hai"
BACKBONES = ("auto",) + multi_exit.ARCHS
_AUTO_BACKBONE = {"digits_conv": "digits", "resnet18": "resnet18"}
_PROB = Range(0, 1)
_EXIT_OR_OFF = Range(0, multi_exit.NUM_STAGES, integer=True)


def defaults() -> ml_collections.ConfigDict:
  """The `hai` section: the released code's settings unless stated."""
  c = ml_collections.ConfigDict()
  c.backbone = "auto"            # auto: model.encoder digits_conv -> digits, resnet18 -> resnet18
  c.exits = (1, 2, 3, 4)         # exits with a view pair and a loss (S = len); must end with 4
  c.embed_exits = (2, 3, 4)      # exits expanded with colour embeddings (others in it: unused)
  c.schedule = "add_one"         # add_one | uniform | strength (the supplement's baselines)
  c.grayscale_from = 2           # first exit whose views get each op (0: never)
  c.blur_from = 3                # (blur is off at <= 32 px whatever this says)
  c.flip_from = 4
  c.rotation_from = 0            # quarter-turn rotation, the supplement's optional extra
  c.jitter = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(brightness, contrast, saturation, hue)
  c.jitter_probability = 0.8
  c.grey_probability = 0.2
  c.blur_probability = 0.5
  c.flip_probability = 0.5
  c.rotation_probability = 0.5
  c.embed_dim = 512              # augmentation embedding width
  c.projector_layers = 3         # SimSiam's 3-layer projector (2: the CIFAR recipe)
  c.projector_hidden = 0         # 0: model.embedding_dim (the projector's output width)
  c.predictor_hidden = 0         # 0: model.embedding_dim // 4 (512 for 2048)
  c.fix_predictor_lr = True      # predictor at the constant base lr (SimSiam's --fix-pred-lr)
  c.base_decay = 0.99            # byol_hai: the supplement's EMA decay (cosine to 1)
  c.lambda_offdiag = 3.9e-3      # barlow_hai: lambda (the supplement)
  c.scale_loss = 1.0 / 32.0      # barlow_hai: factor on the whole loss (the supplement)
  return c


RANGES = {
    "backbone": Choice(BACKBONES), "schedule": Choice(hai_data.SCHEDULES),
    "exits": Range(1, multi_exit.NUM_STAGES, integer=True, shape="tuple"),
    "embed_exits": Range(1, multi_exit.NUM_STAGES, integer=True, shape="tuple"),
    "grayscale_from": _EXIT_OR_OFF, "blur_from": _EXIT_OR_OFF, "flip_from": _EXIT_OR_OFF,
    "rotation_from": _EXIT_OR_OFF, "jitter": Range(0, shape="tuple"),
    "jitter_probability": _PROB, "grey_probability": _PROB, "blur_probability": _PROB,
    "flip_probability": _PROB, "rotation_probability": _PROB,
    "embed_dim": Range(0, integer=True), "projector_layers": Range(2, 3, integer=True),
    "projector_hidden": Range(0, integer=True), "predictor_hidden": Range(0, integer=True),
    "base_decay": Range(0, 1),
    "lambda_offdiag": Range(0), "scale_loss": Range(0, lo_open=True),
}


def backbone_arch(config) -> str:
  """The multi-exit architecture `hai.backbone` names ("auto": from model.encoder)."""
  name = config.hai.backbone
  if name != "auto":
    return name
  if config.model.encoder not in _AUTO_BACKBONE:
    raise ValueError(f"hai.backbone='auto' maps model.encoder digits_conv or resnet18, got "
                     f"{config.model.encoder!r}; pass --config.hai.backbone=resnet18 (or "
                     f"resnet50, digits)")
  return _AUTO_BACKBONE[config.model.encoder]


def check(name: str):
  """The registry `check` of the three methods: two shared-encoder views for the eval views,
  and a coherent `hai` section."""
  two_view = siamese.two_view_check(name)

  def run(config) -> list:
    problems = two_view(config)
    h = config.hai
    exits = tuple(h.exits)
    if list(exits) != sorted(set(exits)) or not exits or exits[-1] != multi_exit.NUM_STAGES:
      problems.append(f"config.hai.exits={exits}: increasing exits ending with "
                      f"{multi_exit.NUM_STAGES} (the probe reads the last one), e.g. (2, 4).")
    if len(h.jitter) != 4 or h.jitter[3] > 0.5:
      problems.append(f"config.hai.jitter={tuple(h.jitter)}: (brightness, contrast, "
                      f"saturation, hue) with hue <= 0.5.")
    if h.backbone == "auto" and config.model.encoder not in _AUTO_BACKBONE:
      problems.append(f"config.hai.backbone='auto' needs model.encoder digits_conv or "
                      f"resnet18 (got {config.model.encoder!r}): pass "
                      f"--config.hai.backbone=resnet18, resnet50 or digits.")
    return problems
  return run


def variant(config: ml_collections.ConfigDict) -> None:
  """A dataset config made these methods' setup (docs/hierarchical_augmentation.md §9): two
  shared-encoder eval views, then the recipe for its data. Small grey data (the digits_conv
  configs: digits, Fashion-MNIST): the multi-exit digits net, a 64-wide augmentation embedding,
  flip only where data.flip allows it. CIFAR-10/100: native 32 px (blur off, as the released
  code switches it), CIFAR ResNet-18 and SimSiam's CIFAR recipe (Chen & He 2021, App. D).
  Other data (STL-10, Tiny ImageNet, folders): the authors' ImageNet recipe, ResNet-50 at
  224 px. Four exits (S = 4) with colour embeddings at exits 2-4 everywhere."""
  siamese.two_view_variant(config)
  if config.model.encoder == "digits_conv":
    config.hai.embed_dim = 64
    config.hai.flip_from = 4 if config.data.flip else 0
  elif config.dataset in ("cifar10", "cifar100"):
    _cifar_recipe(config)
  else:
    _imagenet_recipe(config)


def _paper_heads(config, projector_layers: int) -> None:
  """The released heads: 2048-wide projections, 512-wide predictor and embeddings."""
  h = config.hai
  h.exits, h.embed_exits = (1, 2, 3, 4), (2, 3, 4)
  config.model.embedding_dim = 2048
  h.embed_dim, h.projector_layers, h.projector_hidden, h.predictor_hidden = (
      512, projector_layers, 2048, 512)
  config.data.crop_scale = (0.2, 1.0)
  config.data.flip = True
  config.optim.momentum = 0.9


def _recipe(config, *, projector_layers: int, backbone: str, input_size: int, batch: int,
            epochs: int, lr_per_256: float, weight_decay: float) -> None:
  """The paper's heads, backbone, input size and optimiser; lr = lr_per_256 B / 256 and the
  step decays at 60 % and 80 % of the epochs in place of the cosine."""
  _paper_heads(config, projector_layers=projector_layers)
  config.hai.backbone = backbone
  config.data.input_size = input_size
  config.batch_size = batch
  config.num_epochs = epochs
  config.optim.lr = lr_per_256 * batch / 256
  config.optim.weight_decay = weight_decay
  config.optim.lr_decay_epochs = (epochs * 6 // 10, epochs * 8 // 10)


def _cifar_recipe(config) -> None:
  """32 px, CIFAR ResNet-18, 2-layer projector; batch 512, lr 0.03 B/256, wd 5e-4, 800
  epochs (SimSiam's CIFAR recipe)."""
  _recipe(config, projector_layers=2, backbone="resnet18", input_size=32, batch=512,
          epochs=800, lr_per_256=0.03, weight_decay=5e-4)
  config.model.encoder = "resnet18"


def _imagenet_recipe(config) -> None:
  """224 px, ResNet-50, 3-layer projector; batch 256, lr 0.05 B/256, wd 1e-4, 200 epochs
  (zhangjb416/Hierarchical-Augmentation, main_train.py)."""
  _recipe(config, projector_layers=3, backbone="resnet50", input_size=224, batch=256,
          epochs=200, lr_per_256=0.05, weight_decay=1e-4)
  config.model.encoder = "resnet18"   # unused by these methods (hai.backbone decides)


class HierarchicalMethod(base.Method):
  """The shared machinery: multi-exit backbone ("encoder"), per-exit expanded projectors
  ("heads") and, when `uses_predictor`, per-exit predictors ("predictor")."""

  uses_predictor = True

  def __init__(self, config, facts):
    super().__init__(config, facts)
    h, m = config.hai, config.model
    dtype = parse_dtype(m.dtype)
    self.arch = backbone_arch(config)
    self.backbone = multi_exit.MultiExitEncoder(arch=self.arch, width=float(m.width),
                                                axis_name=parallel.AXIS, dtype=dtype)
    self.spec = hai_data.pipeline_spec(h, config.data, multi_exit.NUM_STAGES)
    self.exits = self.spec.exits
    dim = int(m.embedding_dim)
    self.projectors = {
        e: expanded_heads.ExpandedProjector(
            embed_dim=int(h.embed_dim) if e in tuple(h.embed_exits) else 0,
            hidden=int(h.projector_hidden) or dim, out_dim=dim,
            num_layers=int(h.projector_layers), axis_name=parallel.AXIS, dtype=dtype)
        for e in self.exits}
    self.predictors = {}
    if self.uses_predictor:
      hidden = int(h.predictor_hidden) or max(1, dim // 4)
      self.predictors = {e: heads.PredictorMLP(hidden, dim, axis_name=parallel.AXIS,
                                               dtype=dtype) for e in self.exits}
    self.predictor_tx = (common.sgd_with_coupled_decay(
        config.optim.lr, config.optim.momentum, config.optim.weight_decay)
                         if h.fix_predictor_lr else self.encoder_tx)

  # ---- state ---------------------------------------------------------------------------------
  def init(self, rng, sample_views):
    enc_key, head_key, extra_key, run_key = jax.random.split(rng, 4)
    x = sample_views[0]
    variables = self.backbone.init(enc_key, x, self.exits, method=self.backbone.all_exits)
    feat = multi_exit.feature_dim(self.arch, float(self.config.model.width))
    params = {"encoder": variables["params"], "heads": {}}
    stats = {"encoder": variables["batch_stats"], "heads": {}}
    head_keys = jax.random.split(head_key, 2 * len(self.exits))
    dim = int(self.config.model.embedding_dim)
    for i, e in enumerate(self.exits):
      v = self.projectors[e].init(head_keys[i], jnp.zeros((2, feat)), jnp.zeros((2, 4)),
                                  train=False)
      params["heads"][f"exit{e}"], stats["heads"][f"exit{e}"] = v["params"], v["batch_stats"]
      if self.uses_predictor:
        v = self.predictors[e].init(head_keys[len(self.exits) + i], jnp.zeros((2, dim)),
                                    train=False)
        params.setdefault("predictor", {})[f"exit{e}"] = v["params"]
        stats.setdefault("predictor", {})[f"exit{e}"] = v["batch_stats"]
    opt_state = {"encoder": self.encoder_tx.init(params["encoder"]),
                 "heads": self.encoder_tx.init(params["heads"])}
    if self.uses_predictor:
      opt_state["predictor"] = self.predictor_tx.init(params["predictor"])
    state = common.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                              opt_state=opt_state, banks=None, rng=run_key)
    return self._init_extra(state, extra_key, variables, sample_views)

  # ---- forward passes ------------------------------------------------------------------------
  def stage_views(self, state, batch) -> tuple:
    """This step's (v1, v2, a1, a2) per exit of the device's batch."""
    key = common.step_keys(state, ("augment",))["augment"]
    return hai_data.hierarchical_views(batch["image"], key, self.spec)

  def project(self, enc_params, enc_stats, head_params, head_stats, stage_views):
    """Train-mode z = projector_s([h_s || e_s(a)]) of both views, (2B, D) per exit (view 1's
    rows first); returns (zs, new encoder stats, new head stats)."""
    zs, new_heads = [], {}
    for e, (v1, v2, a1, a2) in zip(self.exits, stage_views):
      h, mutated = self.backbone.apply({"params": enc_params, "batch_stats": enc_stats},
                                       jnp.concatenate([v1, v2]), e, True,
                                       mutable=["batch_stats"])
      enc_stats = mutated["batch_stats"]
      k = f"exit{e}"
      (z, _), mutated = self.projectors[e].apply(
          {"params": head_params[k], "batch_stats": head_stats[k]}, h,
          jnp.concatenate([a1, a2]), True, mutable=["batch_stats"])
      new_heads[k] = mutated["batch_stats"]
      zs.append(z)
    return zs, enc_stats, new_heads

  def predict(self, pred_params, pred_stats, zs):
    """Train-mode p = predictor_s(z_s) per exit; returns (ps, new predictor stats)."""
    ps, new = [], {}
    for e, z in zip(self.exits, zs):
      k = f"exit{e}"
      p, mutated = self.predictors[e].apply(
          {"params": pred_params[k], "batch_stats": pred_stats[k]}, z, True,
          mutable=["batch_stats"])
      ps.append(p)
      new[k] = mutated["batch_stats"]
    return ps, new

  def features(self, state_params, state_stats, views) -> dict:
    """The probe's levels from the last exit only, views concatenated: conv = the backbone's
    pooled last stage, fc = its projector's first hidden layer, embedding = the normalised
    projection; the expansion gets the identity jitter [1, 1, 1, 0] (eval views are not
    jittered)."""
    last = multi_exit.NUM_STAGES
    k = f"exit{last}"
    conv, fc, emb = [], [], []
    for v in views:
      h = self.backbone.apply({"params": state_params["encoder"],
                               "batch_stats": state_stats["encoder"]}, v, last, False)
      a = jnp.broadcast_to(jnp.asarray(hai_data.IDENTITY_JITTER, jnp.float32),
                           (v.shape[0], 4))
      z, hidden = self.projectors[last].apply(
          {"params": state_params["heads"][k], "batch_stats": state_stats["heads"][k]},
          h, a, False)
      conv.append(h)
      fc.append(hidden)
      emb.append(l2_normalize(z))
    return {"conv": jnp.concatenate(conv, -1), "fc": jnp.concatenate(fc, -1),
            "embedding": jnp.concatenate(emb, -1)}

  # ---- updates -------------------------------------------------------------------------------
  def _sgd_step(self, state, loss_fn, parts: tuple):
    """One step of `parts` on loss_fn({part: params}) -> (loss, (new stats per part, aux)),
    gradients pmean'd after grad. Returns (params, stats, opt_state of the parts, loss, aux,
    metrics)."""
    online = {p: state.params[p] for p in parts}
    (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(online)
    grads = parallel.pmean(grads)
    params, opt, update_norm = {}, {}, []
    for p in parts:
      tx = self.predictor_tx if p == "predictor" else self.encoder_tx
      updates, opt[p] = tx.update(grads[p], state.opt_state[p], state.params[p])
      params[p] = optax.apply_updates(state.params[p], updates)
      update_norm.append(common.global_norm(updates))
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads),
               "update_norm": jnp.sqrt(sum(jnp.square(u) for u in update_norm))}
    return params, stats, opt, loss, aux, metrics

  def per_exit_metrics(self, per_exit) -> dict:
    return {f"loss_exit{e}": l for e, l in zip(self.exits, per_exit)}


def _halves(x):
  return jnp.split(x, 2, axis=0)


def _pair(anchor: jax.Array, positive: jax.Array) -> feature_aug.ContrastBatch:
  """One direction of an exit: anchor (B, D) against its one positive (B, D)."""
  return feature_aug.ContrastBatch(anchor=anchor, positive=positive[:, None])


@registry.register(
    "simsiam_hai", summary="SimSiam + hierarchical augmentation invariance with expanded "
    "views: one SimSiam loss per encoder exit", section=SECTION, defaults=defaults,
    ranges=RANGES, variant=variant, check=check("simsiam_hai"))
class SimSiamHAI(HierarchicalMethod):
  """The released base method: per-exit SimSiam losses, summed."""

  @staticmethod
  def exit_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 of one exit's (2B, D) predictions and
    projections, view 1's rows first (Chen & He 2021, Eq. 4)."""
    (p1, p2), (z1, z2) = _halves(p), _halves(z)
    return 0.5 * (adapters.negative_cosine(_pair(p1, z2)) +
                  adapters.negative_cosine(_pair(p2, z1)))

  def train_step(self, state, batch):
    views = self.stage_views(state, batch)

    def loss_fn(online):
      zs, enc_stats, head_stats = self.project(online["encoder"], state.batch_stats["encoder"],
                                               online["heads"], state.batch_stats["heads"],
                                               views)
      ps, pred_stats = self.predict(online["predictor"], state.batch_stats["predictor"], zs)
      per = [self.exit_loss(p, z) for p, z in zip(ps, zs)]
      stats = {"encoder": enc_stats, "heads": head_stats, "predictor": pred_stats}
      return sum(per), (stats, (per, zs[-1]))

    params, stats, opt, _, (per, z_last), metrics = self._sgd_step(
        state, loss_fn, ("encoder", "heads", "predictor"))
    z1 = _halves(z_last)[0]
    metrics.update(self.per_exit_metrics(per))
    metrics["projection_std_per_dim"] = jnp.mean(jnp.std(l2_normalize(z1), axis=0))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt)
    return new_state, parallel.pmean(metrics)


def byol_variant(config):
  variant(config)
  config.hai.fix_predictor_lr = False


@registry.register(
    "byol_hai", summary="BYOL + hierarchical augmentation invariance with expanded views: "
    "one BYOL loss per exit, EMA target of backbone and exit projectors", section=SECTION,
    defaults=defaults, ranges=RANGES, variant=byol_variant, check=check("byol_hai"))
class BYOLHAI(HierarchicalMethod):
  """Per-exit BYOL losses; the target (backbone and every exit's embedder + projector) is the
  EMA of the online ones with BYOL's cosine decay from `hai.base_decay` to 1."""

  def __init__(self, config, facts):
    super().__init__(config, facts)
    self.total_steps = int(config.num_train_steps or config.num_epochs * facts.steps_per_epoch)

  @staticmethod
  def exit_loss(p: jax.Array, t: jax.Array) -> jax.Array:
    """2 - 2 cos(p1, sg(t2)) + 2 - 2 cos(p2, sg(t1)) of one exit's (2B, D) online predictions
    and target projections, view 1's rows first (Grill et al. 2020, Eq. 2 symmetrised)."""
    (p1, p2), (t1, t2) = _halves(p), _halves(t)
    return (adapters.negative_cosine(_pair(p1, t2), form="byol") +
            adapters.negative_cosine(_pair(p2, t1), form="byol"))

  def _init_extra(self, state, key, variables, sample_views):
    return state.replace(
        params={**state.params, "target": state.params["encoder"],
                "target_heads": state.params["heads"]},
        batch_stats={**state.batch_stats, "target": state.batch_stats["encoder"],
                     "target_heads": state.batch_stats["heads"]})

  def train_step(self, state, batch):
    views = self.stage_views(state, batch)
    tz, t_stats, th_stats = self.project(state.params["target"], state.batch_stats["target"],
                                         state.params["target_heads"],
                                         state.batch_stats["target_heads"], views)
    targets = [jax.lax.stop_gradient(z) for z in tz]

    def loss_fn(online):
      zs, enc_stats, head_stats = self.project(online["encoder"], state.batch_stats["encoder"],
                                               online["heads"], state.batch_stats["heads"],
                                               views)
      ps, pred_stats = self.predict(online["predictor"], state.batch_stats["predictor"], zs)
      per = [self.exit_loss(p, t) for p, t in zip(ps, targets)]
      stats = {"encoder": enc_stats, "heads": head_stats, "predictor": pred_stats}
      return sum(per), (stats, per)

    params, stats, opt, _, per, metrics = self._sgd_step(
        state, loss_fn, ("encoder", "heads", "predictor"))
    decay = ema.byol_decay(state.step, self.total_steps, self.config.hai.base_decay)
    params["target"] = ema.ema_update(state.params["target"], params["encoder"], decay)
    params["target_heads"] = ema.ema_update(state.params["target_heads"], params["heads"],
                                            decay)
    stats.update(target=t_stats, target_heads=th_stats)
    metrics.update(self.per_exit_metrics(per))
    metrics["target_decay"] = decay
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt)
    return new_state, parallel.pmean(metrics)


@registry.register(
    "barlow_hai", summary="Barlow Twins + hierarchical augmentation invariance with expanded "
    "views: one Barlow Twins loss per exit", section=SECTION, defaults=defaults,
    ranges=RANGES, variant=variant, check=check("barlow_hai"))
class BarlowHAI(HierarchicalMethod):
  """Per-exit Barlow Twins losses on the exits' projections (no predictor)."""

  uses_predictor = False

  def exit_loss(self, z: jax.Array) -> jax.Array:
    """`hai.scale_loss` x Barlow Twins' loss of one exit's (2B, D) projections, view 1's rows
    first, the cross-correlation over the global batch (Zbontar et al. 2021, Eq. 1)."""
    h = self.config.hai
    z1, z2 = _halves(z)
    return h.scale_loss * adapters.barlow_twins(_pair(z1, z2), h.lambda_offdiag,
                                                axis_name=parallel.AXIS)

  def train_step(self, state, batch):
    views = self.stage_views(state, batch)

    def loss_fn(online):
      zs, enc_stats, head_stats = self.project(online["encoder"], state.batch_stats["encoder"],
                                               online["heads"], state.batch_stats["heads"],
                                               views)
      per = [self.exit_loss(z) for z in zs]
      return sum(per), ({"encoder": enc_stats, "heads": head_stats}, per)

    params, stats, opt, _, per, metrics = self._sgd_step(state, loss_fn, ("encoder", "heads"))
    metrics.update(self.per_exit_metrics(per))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt)
    return new_state, parallel.pmean(metrics)
