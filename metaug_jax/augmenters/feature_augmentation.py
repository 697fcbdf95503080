"""FA, the configurable feature-augmentation module (Zhang et al., "Feature Augmentation for
Self-supervised Contrastive Learning: A Closer Look", arXiv 2410.12396), as a
`feature_aug.FeatureAugmenter` (docs/feature_augmentation.md §3).

The paper's abstract names the design axes (FA architectures, the gradient flow, FA beside
data augmentation) but not its choices, so every axis is a field of the config section `fa`
(`defaults()`, `RANGES`, cross-field rules in `problems`):

  * `op`, what a copy is: Gaussian noise, dropout, mixing with the instance's other view
    (`intra_mix`, interpolation or FT's extrapolation), mixing with another instance of the
    batch (`inter_mix`, a virtual instance: both views mixed with one partner and coefficient,
    so the copy's target is the same mixture), or a learned generator (MetAug's without its
    meta step, models/feature_generator.py, trained adversarially or jointly);
  * `side`, which features are copied: the online ones (anchors, predictions), the target ones
    (keys, positives) or both; `usage` (read by the methods): an extra positive pair beside the
    original, in place of it, or copies of the negatives as extra negatives;
  * `grad_policy`: gradient `through` the copy, `detach_input` (FA of a stop-gradient input) or
    `detach_output` (copies only as stop-gradient targets);
  * `renorm`: each copy rescaled to its original's norm (L2 normalisation for unit embeddings).

One `apply` draws ONE copy: it rewrites a ContrastBatch of the features at the module's
placement (anchor: a direction's online feature; positive: the other view's target-side feature
at the same level, or the target itself where the target side has no such level, the
predictor; negatives: the loss's negatives, for `usage=extra_negative`) into the batch of that
copy. The methods (methods/feature_augmentation.py) draw `num_copies` of them, carry them
through what follows the placement (projector, predictor) and weigh the FA term into the loss.
`to_enqueue` is never touched, and every per-row draw is made for the global batch and sliced,
so a step does not depend on the device count.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax

from metaug_jax import feature_aug, parallel
from metaug_jax.config_check import Choice, Range
from metaug_jax.models.feature_generator import FeatureGenerator

PLACEMENTS = ("backbone", "projector", "predictor")
OPS = ("noise", "dropout", "intra_mix", "inter_mix", "learned")
USAGES = ("extra_positive", "replace", "extra_negative")
SIDES = ("online", "target", "both")
GRAD_POLICIES = ("through", "detach_input", "detach_output")
MIX_DISTRIBUTIONS = ("beta", "fixed")
GENERATOR_MODES = ("adversarial", "joint")
FAMILIES = ("discrimination", "similarity")
MAX_COPIES = 4

# The learned generator's similarity penalty in `apply`'s metrics: a scalar that carries the
# gradient to the generator's parameters; the methods add `penalty_weight * it` to the loss.
PENALTY = "fa_generator_penalty"


def defaults() -> ml_collections.ConfigDict:
  """The `fa` config section (docs/feature_augmentation.md §3.1)."""
  c = ml_collections.ConfigDict()
  c.placement = "projector"        # backbone (re-projected), projector, predictor (online only)
  c.op = "noise"                   # noise, dropout, intra_mix, inter_mix, learned
  c.num_copies = 1                 # augmented copies per feature and step
  c.usage = "extra_positive"       # extra_positive, replace, extra_negative
  c.side = "target"                # which features are copied: online, target, both
  c.grad_policy = "detach_output"  # through, detach_input, detach_output
  c.weight = 1.0                   # beta in L = L_orig + beta L_FA (extra_positive)
  c.warmup_steps = 0               # FA is off (L = L_orig) before this step
  c.renorm = True                  # rescale each copy to its original's norm
  c.noise_std = 0.1                # sigma of the Gaussian noise
  c.noise_relative = True          # sigma relative to each row's RMS (else absolute)
  c.dropout_rate = 0.1             # p of the dropout copy
  c.mix_distribution = "beta"      # the mixing coefficient: beta (drawn) or fixed
  c.mix_alpha = 2.0                # u ~ Beta(alpha, alpha)
  c.mix_lambda = 0.9               # the coefficient with mix_distribution=fixed
  c.mix_extrapolate = False        # lambda = 1 + u (FT's positives) instead of u
  c.generator_mode = "adversarial"  # the generator maximises (adversarial) or minimises L_FA
  c.generator_hidden = 256         # hidden width of the generator's MLP
  c.generator_noise_dim = 16       # width of its noise input (0: deterministic)
  c.generator_lr = 0.01            # its own SGD
  c.generator_momentum = 0.9
  c.similarity_margin = 0.9        # delta of the hinge max(0, delta - cos(x', x))
  c.similarity_weight = 1.0        # weight of that hinge in the generator's objective
  c.score_stats = True             # log score statistics of the original and the FA term
  return c


RANGES = {
    "placement": Choice(PLACEMENTS), "op": Choice(OPS),
    "num_copies": Range(1, MAX_COPIES, integer=True), "usage": Choice(USAGES),
    "side": Choice(SIDES), "grad_policy": Choice(GRAD_POLICIES), "weight": Range(0),
    "warmup_steps": Range(0, integer=True), "noise_std": Range(0),
    "dropout_rate": Range(0, 1, hi_open=True), "mix_distribution": Choice(MIX_DISTRIBUTIONS),
    "mix_alpha": Range(0, lo_open=True), "mix_lambda": Range(0, 2),
    "generator_mode": Choice(GENERATOR_MODES), "generator_hidden": Range(1, integer=True),
    "generator_noise_dim": Range(0, integer=True), "generator_lr": Range(0),
    "generator_momentum": Range(0, 1, hi_open=True), "similarity_margin": Range(-1, 1),
    "similarity_weight": Range(0),
}


def problems(config, method: str, family: str, has_predictor: bool) -> list:
  """One line per combination of `config.fa` that `method` cannot train (the registry check).

  Args:
    config: the whole config.
    method: the method's name, for the messages.
    family: "discrimination" (InfoNCE / NT-Xent, with negatives) or "similarity" (BYOL,
      SimSiam: no negatives).
    has_predictor: whether the method has a predictor (placement "predictor").
  """
  c, out = config.fa, []
  if any(getattr(c, f) not in RANGES[f].options for f in
         ("placement", "op", "usage", "side", "grad_policy")):
    return out  # the field table reports the bad choice itself
  if c.placement == "predictor" and not has_predictor:
    out.append(f"config.fa.placement='predictor' needs a method with a predictor "
               f"(byol_fa, simsiam_fa); {method} has none: pass --config.fa.placement=projector "
               f"or backbone.")
  if c.placement == "predictor" and c.side != "online" and c.op != "inter_mix":
    out.append(f"config.fa.placement='predictor' copies predictions, which only the online side "
               f"has: pass --config.fa.side=online (got {c.side!r}).")
  if c.usage == "extra_negative":
    if family == "similarity":
      out.append(f"config.fa.usage='extra_negative': {method} has no negatives; pass "
                 f"--config.fa.usage=extra_positive or replace.")
    elif c.placement != "projector":
      out.append("config.fa.usage='extra_negative' copies the loss's negatives, which are "
                 "projector outputs: pass --config.fa.placement=projector.")
    if c.op == "intra_mix":
      out.append("config.fa.op='intra_mix' mixes an instance's two views, which a negative "
                 "does not have: pass another --config.fa.op for extra negatives.")
    if c.side != "target":
      out.append("config.fa.usage='extra_negative' copies negatives, which belong to the "
                 "target side: pass --config.fa.side=target.")
  elif c.op == "inter_mix" and c.side != "both":
    out.append("config.fa.op='inter_mix' makes a virtual instance (both views mixed with one "
               "partner, so the copy's target is the same mixture): pass --config.fa.side=both.")
  if c.grad_policy == "detach_output" and c.side != "target" and c.usage != "extra_negative":
    out.append(f"config.fa.grad_policy='detach_output' makes copies stop-gradient targets, so "
               f"an online copy (fa.side={c.side!r}) would train nothing: pass "
               f"--config.fa.side=target or another grad_policy.")
  if c.op == "learned":
    if c.grad_policy == "detach_output":
      out.append("config.fa.op='learned' with fa.grad_policy='detach_output' leaves the "
                 "generator without gradient: pass through or detach_input.")
    if c.usage == "extra_positive" and c.weight == 0:
      out.append("config.fa.op='learned' with fa.weight=0 leaves the generator without "
                 "gradient: pass a positive --config.fa.weight.")
    if c.num_copies > 1 and c.generator_noise_dim == 0:
      out.append(f"config.fa.num_copies={c.num_copies} copies of a deterministic generator "
                 f"(fa.generator_noise_dim=0) are identical: pass a noise width or one copy.")
  return out


# ---- the operators (pure) --------------------------------------------------------------------


def gaussian_noise(x: jax.Array, eps: jax.Array, std: float, relative: bool) -> jax.Array:
  """x + sigma s eps with eps ~ N(0, I) given; s = each row's RMS (no gradient) when
  `relative`, so sigma is the noise-to-feature norm ratio at every placement; else s = 1."""
  chex.assert_equal_shape([x, eps])
  scale = std
  if relative:
    scale = std * jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True)))
  return x + scale * eps


def dropout(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """m * x / (1 - p), m the given boolean keep mask (Bernoulli(1 - p) per entry)."""
  chex.assert_equal_shape([x, keep])
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def mix(x: jax.Array, partner: jax.Array, lam: jax.Array) -> jax.Array:
  """lam x + (1 - lam) partner (lam = 1: x exactly)."""
  chex.assert_equal_shape([x, partner])
  return lam * x + (1.0 - lam) * partner


def mix_coefficient(key: jax.Array, config) -> jax.Array:
  """One scalar lambda per copy: mix_lambda (fixed), or u ~ Beta(a, a), or 1 + u
  (mix_extrapolate, FT's harder positives)."""
  if config.mix_distribution == "fixed":
    return jnp.float32(config.mix_lambda)
  u = jax.random.beta(key, config.mix_alpha, config.mix_alpha, (), jnp.float32)
  return 1.0 + u if config.mix_extrapolate else u


def cyclic_partners(key: jax.Array, n: int) -> jax.Array:
  """(n,) a random permutation made of one cycle: no row is its own partner (n >= 2)."""
  order = jax.random.permutation(key, n)
  return jnp.zeros((n,), jnp.int32).at[order].set(jnp.roll(order, -1).astype(jnp.int32))


def restore_norm(y: jax.Array, x: jax.Array) -> jax.Array:
  """Each row of y rescaled to the norm of x's row (y == x gives x exactly)."""
  norm_x = jnp.linalg.norm(x, axis=-1, keepdims=True)
  norm_y = jnp.linalg.norm(y, axis=-1, keepdims=True)
  return y * (norm_x / jnp.maximum(norm_y, jnp.finfo(y.dtype).tiny))


def scale_gradient(tree, factor: float):
  """`tree` unchanged, with its gradient multiplied by `factor` (-1: gradient reversal)."""
  def scaled(x):
    still = jax.lax.stop_gradient(x)
    return still + factor * (x - still)
  return jax.tree.map(scaled, tree)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity."""
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return num / jnp.maximum(den, jnp.finfo(a.dtype).tiny)


def similarity_penalty(y: jax.Array, x: jax.Array, margin: float) -> jax.Array:
  """mean max(0, delta - cos(y, x)): keeps a generated copy close to its original."""
  return jnp.mean(jax.nn.relu(margin - cosine(y, x)))


# ---- the augmenter ---------------------------------------------------------------------------


class FeatureAugmentation:
  """The FA module as a FeatureAugmenter; with op "learned" also a LearnedAugmenter.

  Args:
    config: the `fa` config section (`defaults()`).
    global_batch: the global batch size when `apply` runs inside a pmapped step with the
      batch split over devices: per-row draws are then made for the global batch and sliced,
      and inter-instance partners are drawn over it. None: the local batch is the whole batch.
  """

  KEY_NAMES = ("online", "target", "mix", "negatives")

  def __init__(self, config: ml_collections.ConfigDict, global_batch: Optional[int] = None):
    self.config = config
    self.global_batch = global_batch
    self.generator = FeatureGenerator(hidden=int(config.generator_hidden),
                                      noise_dim=int(config.generator_noise_dim))

  @property
  def learned(self) -> bool:
    return self.config.op == "learned"

  def keys(self, key: jax.Array) -> dict:
    """The named keys of one copy (the same split `apply` makes)."""
    return dict(zip(self.KEY_NAMES, jax.random.split(key, len(self.KEY_NAMES))))

  def partners(self, key: jax.Array, n: int, of_negatives: bool = False) -> jax.Array:
    """The inter_mix partners `apply` draws for a copy's key: over the n rows of the global
    batch (instances), or over the n negatives (`of_negatives`)."""
    return cyclic_partners(self.keys(key)["negatives" if of_negatives else "mix"], n)

  def init(self, key, sample: feature_aug.ContrastBatch):
    """(generator params for the sample's feature width, {}); ({}, {}) without a generator."""
    if not self.learned:
      return {}, {}
    width, noise = sample.anchor.shape[-1], int(self.config.generator_noise_dim)
    variables = self.generator.init(key, jnp.zeros((2, width)),
                                    jnp.zeros((2, noise)) if noise else None)
    return variables["params"], {}

  def optimizer(self) -> optax.GradientTransformation:
    """The generator's own SGD (LearnedAugmenter)."""
    c = self.config
    return optax.sgd(c.generator_lr, momentum=c.generator_momentum or None)

  def generator_gradient_factor(self) -> float:
    """What the FA term's gradient to the generator is multiplied by, so that its update is
    -dL_FA/dphi (adversarial: it ascends L_FA) or +dL_FA/dphi (joint), whatever the weight
    the method gives the term (`weight` for extra_positive, 1 otherwise)."""
    c = self.config
    weight = float(c.weight) if c.usage == "extra_positive" else 1.0
    return (-1.0 if c.generator_mode == "adversarial" else 1.0) / weight

  # ---- draws -------------------------------------------------------------------------------

  def _rows(self, key, shape, draw, local: bool):
    """`draw(key, shape)` for the global batch, sliced to this device's rows (`local`), or
    for the rows as they are (negatives, identical on every device)."""
    rows = shape[0]
    if not local or self.global_batch in (None, rows):
      return draw(key, shape)
    return parallel.local_rows(draw(key, (self.global_batch,) + tuple(shape[1:])), rows)

  def _global(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the rows of the global batch, this device's positions in it)."""
    b = x.shape[0]
    if self.global_batch in (None, b):
      return x, jnp.arange(b)
    return parallel.gather_rows(x), parallel.device_offset(b) + jnp.arange(b)

  # ---- one copy ----------------------------------------------------------------------------

  def _op(self, params, key, x, partner, lam, local: bool, metrics: dict) -> jax.Array:
    """One copy of x by the configured op (noise, dropout, intra_mix, learned)."""
    c = self.config
    if c.op == "noise":
      eps = self._rows(key, x.shape, lambda k, s: jax.random.normal(k, s, x.dtype), local)
      return gaussian_noise(x, eps, c.noise_std, bool(c.noise_relative))
    if c.op == "dropout":
      keep = self._rows(key, x.shape,
                        lambda k, s: jax.random.bernoulli(k, 1.0 - c.dropout_rate, s), local)
      return dropout(x, keep, c.dropout_rate)
    if c.op == "intra_mix":
      return mix(x, partner, lam)
    if c.op == "learned":
      width = int(c.generator_noise_dim)
      noise = (self._rows(key, (x.shape[0], width),
                          lambda k, s: jax.random.normal(k, s, jnp.float32), local)
               if width else None)
      scaled = scale_gradient(params, self.generator_gradient_factor())
      y = self.generator.apply({"params": scaled}, x, noise)
      fixed = jax.lax.stop_gradient(x)
      penalty = similarity_penalty(self.generator.apply({"params": params}, fixed, noise),
                                   fixed, c.similarity_margin)
      metrics[PENALTY] = metrics.get(PENALTY, 0.0) + penalty
      return y
    raise ValueError(f"fa.op={c.op!r} has no per-feature copy; choose one of {OPS}")

  def _finish(self, y, x, metrics: dict, name: str) -> jax.Array:
    """renorm, detach_output and the copy's cosine to its original (a metric)."""
    c = self.config
    if c.renorm:
      y = restore_norm(y, x)
    if c.grad_policy == "detach_output":
      y = jax.lax.stop_gradient(y)
    metrics[f"fa_copy_cosine_{name}"] = jnp.mean(cosine(jax.lax.stop_gradient(y),
                                                        jax.lax.stop_gradient(x)))
    return y

  def _inputs(self, *xs):
    if self.config.grad_policy == "detach_input":
      return tuple(jax.lax.stop_gradient(x) for x in xs)
    return xs

  def apply(self, params, state, key, batch: feature_aug.ContrastBatch, step):
    """(the batch of one copy, state, metrics): anchor and/or positive replaced by their
    copies (`side`), or the copies of the negatives as `extra_negative` (usage
    extra_negative)."""
    del step
    c = self.config
    keys = self.keys(key)
    lam = mix_coefficient(keys["mix"], c)
    metrics = {"fa_lambda": lam} if c.op in ("intra_mix", "inter_mix") else {}
    if c.usage == "extra_negative":
      negatives = batch.negatives
      if negatives is None or negatives.ndim != 2:
        raise ValueError("fa.usage='extra_negative' needs (K, D) negatives shared by the "
                         "anchors (a queue or the gathered batch)")
      (n,) = self._inputs(negatives)
      if c.op == "inter_mix":
        y = mix(n, n[self.partners(key, n.shape[0], of_negatives=True)], lam)
      else:
        y = self._op(params, keys["negatives"], n, None, lam, False, metrics)
      y = self._finish(y, n, metrics, "negatives")
      return (batch.replace(extra_negative=y[None], unit_norm=batch.unit_norm and c.renorm),
              state, metrics)
    anchor, positive = self._inputs(batch.anchor, batch.positive[:, 0])
    if c.op == "inter_mix":
      (all_anchor, rows), (all_positive, _) = self._global(anchor), self._global(positive)
      partner = self.partners(key, all_anchor.shape[0])[rows]
      new_anchor = mix(anchor, all_anchor[partner], lam)
      new_positive = mix(positive, all_positive[partner], lam)
    else:
      new_anchor = new_positive = None
      if c.side in ("online", "both"):
        new_anchor = self._op(params, keys["online"], anchor, positive, lam, True, metrics)
      if c.side in ("target", "both"):
        new_positive = self._op(params, keys["target"], positive, anchor, lam, True, metrics)
    out = batch
    if new_anchor is not None:
      out = out.replace(anchor=self._finish(new_anchor, anchor, metrics, "online"))
    if new_positive is not None:
      out = out.replace(positive=self._finish(new_positive, positive, metrics, "target")[:, None])
    return out.replace(unit_norm=batch.unit_norm and c.renorm), state, metrics
