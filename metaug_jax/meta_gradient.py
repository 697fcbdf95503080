"""The meta-gradient strategies of MetAug's Phase B, one function each (docs/metaug.md §6).

The generators omega are trained on F(omega) = L_total(theta'(omega), omega), with the virtual
SGD step theta'(omega) = theta - alpha grad_theta L_total(theta, omega) (docs/metaug.md §5.2).
dF/domega has a direct part (at fixed theta') and a second-order part through theta'(omega).
The functions here take the step's objective as an `Objective` (L_total split at the
embeddings: L_total(theta, omega) = head(encode(theta), omega)) and return its two parts as a
`MetaGradient` (`combine` sums them):

  reverse               jax.grad of a function that calls jax.grad (§6.3)
  forward_over_reverse  the second-order part as a jvp of the head's omega-gradient along the
                        encoders' linear map of the outer gradient (§6.4)
  fused_reverse         virtual step from the current theta: Phase A's gradient and the
                        meta-gradient from one double backward (§6.5); forward-over-reverse
                        from the current theta reuses Phase A's `linearize` instead
  first_order           the direct part only: theta' taken as a constant (§6.6)
  legacy_generators, legacy_encoder_lookahead
                        the authors' earlier step (§5.3)

`strategy_name(config.metaug)` says which one a config selects. Every gradient is pmean'd over
the devices after it is taken (docs/implementation.md §3.2).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from metaug_jax import parallel

# The objective evaluations of one step; each draws its own negatives (docs/metaug.md, A13).
PHASES = ("phase_a", "inner", "outer", "inner2", "outer2")


class Objective(NamedTuple):
  """One step's L_total(theta, omega) (docs/metaug.md §4.2), split at the embeddings.

  encode(theta, update_stats) -> (z, encoder BatchNorm statistics): the encoders in train
    mode; with update_stats=False the statistics are the old ones (a virtual forward).
  head(z, omega, banks, phase, update_stats) -> (loss, HeadAux): the generators, the bank calls
    (with `phase`'s negatives, one of PHASES) and the losses.
  """
  encode: Callable
  head: Callable


class HeadAux(NamedTuple):
  """What an evaluation of the head returns besides the loss."""
  generator_stats: Any      # the MAGs' BatchNorm statistics (old ones unless update_stats)
  banks: Any                # after the calls (updated inside with bank.schedule=code_exact)
  metrics: dict
  views: tuple              # the views' ContrastBatches: to_enqueue holds the original z_v


class Linearization(NamedTuple):
  """pmean grad_theta L_total(theta, omega) through the encoders' linearisation, and what
  forward-over-reverse reuses of it."""
  grad: Any                 # pmean'd gradient over theta
  z: tuple                  # the embeddings
  z_lin: Callable           # theta-tangent -> z-tangent, the encoders' linear map
  head: Callable            # (z, omega) -> (loss, HeadAux) with this evaluation's negatives
  encoder_stats: Any
  aux: HeadAux

  @property
  def banks(self):
    return self.aux.banks


class MetaGradient(NamedTuple):
  """The two parts of dF/domega (per device, before the pmean of `combine`), the outer
  evaluation's metrics and the banks after it."""
  direct: Any
  second: Any
  outer_metrics: dict
  banks: Any


class PhaseA(NamedTuple):
  """Phase A's results: the encoders' gradient and what the rest of the step reads."""
  grad: Any
  encoder_stats: Any
  aux: HeadAux
  linearization: Optional[Linearization] = None

  @property
  def banks(self):
    return self.aux.banks


def strategy_name(mc) -> str:
  """The strategy `config.metaug` selects: legacy, first_order, reverse,
  forward_over_reverse, fused_reverse or fused_forward_over_reverse."""
  if mc.algorithm == "legacy":
    return "legacy"
  if mc.first_order:
    return "first_order"
  fused = "fused_" if mc.virtual_step_from == "current" else ""
  return fused + mc.meta_gradient


def virtual_step(theta, g, alpha: float):
  """theta - alpha g: a plain SGD step, no momentum or decay (docs/metaug.md, decision A11)."""
  return jax.tree.map(lambda gi, t: t + (-alpha) * gi, g, theta)


def loss_at(objective: Objective, theta, omega, banks, phase: str):
  """L_total at possibly virtual parameters: batch-statistics BatchNorm, none kept.
  Returns (loss, (banks after the calls, metrics))."""
  z, _ = objective.encode(theta, False)
  loss, aux = objective.head(z, omega, banks, phase, False)
  return loss, (aux.banks, aux.metrics)


def phase_a_loss(objective: Objective, theta, omega, banks):
  """L_total(theta, omega) of Phase A, running statistics kept:
  (loss, (encoder statistics, HeadAux))."""
  z, encoder_stats = objective.encode(theta, True)
  loss, aux = objective.head(z, omega, banks, "phase_a", True)
  return loss, (encoder_stats, aux)


def phase_a(objective: Objective, theta, omega, banks) -> PhaseA:
  """Phase A by reverse mode: pmean grad_theta L_total(theta, omega), the generators fixed."""
  (_, (encoder_stats, aux)), g = jax.value_and_grad(
      lambda t: phase_a_loss(objective, t, omega, banks), has_aux=True)(theta)
  return PhaseA(parallel.pmean(g), encoder_stats, aux)


def linearize(objective: Objective, theta, omega, banks, phase: str,
              update_stats: bool) -> Linearization:
  """pmean grad_theta L_total(theta, omega) through a linearised encoder.

  The encoders are linearised once (jax.linearize: one forward, residuals kept); the transpose
  of that linear map gives the gradient, and the same map later pushes a theta-direction to
  the embeddings for the second-order part without a second encoder forward.
  """
  z, z_lin, encoder_stats = jax.linearize(lambda t: objective.encode(t, update_stats), theta,
                                          has_aux=True)

  def head(zs, w):
    return objective.head(zs, w, banks, phase, update_stats)

  (_, aux), z_bar = jax.value_and_grad(head, has_aux=True)(z, omega)
  (g,) = jax.linear_transpose(z_lin, theta)(z_bar)
  return Linearization(parallel.pmean(g), z, z_lin, head, encoder_stats, aux)


def combine(parts: MetaGradient):
  """pmean the two parts of the generators' gradient, sum them, and log their norms:
  (gradient, metrics)."""
  direct, second = parallel.pmean((parts.direct, parts.second))
  grads = jax.tree.map(jnp.add, direct, second)
  metrics = {"mag_grad_direct_norm": optax.tree.norm(direct),
             "mag_grad_second_order_norm": optax.tree.norm(second),
             "mag_grad_norm": optax.tree.norm(grads),
             "meta_loss": parts.outer_metrics["loss_total"]}
  return grads, metrics


def reverse_meta_objective(objective: Objective, theta, banks, alpha: float):
  """outer(omega_inner, omega_direct) = L_total(theta'(omega_inner), omega_direct).

  theta'(w) = theta - alpha pmean grad_theta L_total(theta, w) ("inner" negatives), kept
  differentiable. At (omega, omega) this is F; its gradient in the first argument is the
  second-order part, in the second the direct part. Returns (loss, (banks, metrics)).
  """
  def outer(omega_inner, omega_direct):
    g, (inner_banks, _) = jax.grad(
        lambda t: loss_at(objective, t, omega_inner, banks, "inner"), has_aux=True)(theta)
    theta_virtual = virtual_step(theta, parallel.pmean(g), alpha)
    return loss_at(objective, theta_virtual, omega_direct, inner_banks, "outer")

  return outer


def reverse(objective: Objective, theta, omega, banks, alpha: float):
  """dF/domega as jax.grad of `reverse_meta_objective` (docs/metaug.md §6.3): the encoders'
  backward graph is itself differentiated, as in the authors' code."""
  outer = reverse_meta_objective(objective, theta, banks, alpha)
  (second, direct), (banks, outer_metrics) = jax.grad(outer, argnums=(0, 1), has_aux=True)(
      omega, omega)
  return MetaGradient(direct, second, outer_metrics, banks)


def forward_over_reverse(objective: Objective, inner: Linearization, theta, omega,
                         alpha: float):
  """dF/domega with the second-order part as a jvp (docs/metaug.md §6.4).

  g = inner.grad is grad_theta L_inner at theta. With v = pmean grad_theta L_total at
  theta' = theta - alpha g, the symmetry of mixed partials gives
    second = -alpha (dg/domega)^T v = -alpha d/domega <grad_z head(z, omega), J v>,
  J = dz/dtheta: the encoders' linear map applied to v (a forward-mode pass), then a jvp of
  the head's omega-gradient. No encoder backward graph is built, kept or differentiated.
  """
  theta_virtual = virtual_step(theta, inner.grad, alpha)
  (_, (banks, outer_metrics)), (v, direct) = jax.value_and_grad(
      lambda t, w: loss_at(objective, t, w, inner.banks, "outer"), argnums=(0, 1),
      has_aux=True)(theta_virtual, omega)
  z_dot = inner.z_lin(parallel.pmean(v))
  omega_grad = lambda zs: jax.grad(lambda w: inner.head(zs, w)[0])(omega)
  _, mixed = jax.jvp(omega_grad, (inner.z,), (z_dot,))
  second = jax.tree.map(lambda m: -alpha * m, mixed)
  return MetaGradient(direct, second, outer_metrics, banks)


def first_order(objective: Objective, theta, g, omega, banks, alpha: float):
  """The direct part alone (docs/metaug.md §6.6): theta' = theta - alpha g with g a value, so
  the second-order part is exactly zero."""
  theta_virtual = virtual_step(theta, jax.lax.stop_gradient(g), alpha)
  (_, (banks, outer_metrics)), direct = jax.value_and_grad(
      lambda w: loss_at(objective, theta_virtual, w, banks, "outer"), has_aux=True)(omega)
  second = jax.tree.map(jnp.zeros_like, direct)
  return MetaGradient(direct, second, outer_metrics, banks)


def fused_reverse(objective: Objective, theta, omega, banks, alpha: float):
  """Phase A and the meta-gradient in one double backward (docs/metaug.md §6.5).

  The virtual step starts from the current theta, so the inner gradient is Phase A's:
  F(w, w') = L_total(theta - alpha grad_theta L_total(theta, w), w'), one encoder
  forward/backward fewer than the paper-aligned order.

  Returns (PhaseA, MetaGradient).
  """
  def outer(omega_inner, omega_direct):
    (_, (encoder_stats, aux_a)), g = jax.value_and_grad(
        lambda t: phase_a_loss(objective, t, omega_inner, banks), has_aux=True)(theta)
    g = parallel.pmean(g)
    loss, (outer_banks, outer_metrics) = loss_at(
        objective, virtual_step(theta, g, alpha), omega_direct, aux_a.banks, "outer")
    return loss, jax.lax.stop_gradient((g, encoder_stats, aux_a, outer_banks, outer_metrics))

  (second, direct), (g, encoder_stats, aux_a, outer_banks, outer_metrics) = jax.grad(
      outer, argnums=(0, 1), has_aux=True)(omega, omega)
  return (PhaseA(g, encoder_stats, aux_a),
          MetaGradient(direct, second, outer_metrics, outer_banks))


def _inner_gradient(inner_loss, params, first_order_only: bool):
  """pmean grad of `inner_loss(params) -> (loss, (banks, metrics))`, kept differentiable
  unless first_order_only; returns (gradient, banks after it)."""
  g, (banks, _) = jax.grad(inner_loss, has_aux=True)(params)
  g = parallel.pmean(g)
  if first_order_only:
    g = jax.lax.stop_gradient(g)
  return g, banks


def legacy_generators(objective: Objective, theta, omega, banks, alpha: float,
                      first_order_only: bool):
  """The authors' earlier MAG step (docs/metaug.md §5.3, step 2): a virtual step of the
  generators' own parameters, omega' = omega - alpha grad_omega L_total(theta, omega),
  differentiated through; direct part through omega, second-order part through the gradient."""
  def outer(omega_first, omega_second):
    g, inner_banks = _inner_gradient(
        lambda w: loss_at(objective, theta, w, banks, "inner"), omega_second, first_order_only)
    return loss_at(objective, theta, virtual_step(omega_first, g, alpha), inner_banks, "outer")

  (direct, second), (banks, outer_metrics) = jax.grad(outer, argnums=(0, 1), has_aux=True)(
      omega, omega)
  return MetaGradient(direct, second, outer_metrics, banks)


def legacy_encoder_lookahead(objective: Objective, theta, omega, banks, alpha: float,
                             first_order_only: bool):
  """Legacy step 3 (docs/metaug.md §5.3): the encoders' gradient of the look-ahead loss
  L_total(theta - alpha grad_theta L_total(theta, omega), omega), Hessian terms included, the
  generators frozen ("inner2" and "outer2" negatives). Returns (gradient, banks, metrics)."""
  def outer(t):
    g, inner_banks = _inner_gradient(
        lambda u: loss_at(objective, u, omega, banks, "inner2"), t, first_order_only)
    return loss_at(objective, virtual_step(t, g, alpha), omega, inner_banks, "outer2")

  grads, (banks, _) = jax.grad(outer, has_aux=True)(theta)
  grads = parallel.pmean(grads)
  return grads, banks, {"lookahead_grad_norm": optax.tree.norm(grads)}
