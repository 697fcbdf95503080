"""Finiteness guard: which step first made the loss, a metric or the state NaN/inf.

`wrap(train_step)` adds, inside the jitted (pmapped) step, one flag per metric and per part of
the updated state (params, opt_state, batch_stats, banks): "all its floating values are
finite". The loop folds each step's flags into a tiny device-side record with `update` (first
bad step and what was bad at it), dispatched like the step, so watching costs no host round
trip; the loop fetches the record only when it syncs anyway (logging steps), before every
checkpoint and at the end, and `first_bad` reads it. Any method gets the guard, since it
wraps the step from outside.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

# The parts of the train state that are checked, and how a message names them.
STATE_PARTS = {"params": "the updated parameters", "opt_state": "the optimiser state",
               "batch_stats": "the BatchNorm statistics", "banks": "the memory banks"}


def all_finite(tree) -> jax.Array:
  """Scalar bool: every floating leaf of `tree` is finite (True without floating leaves)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def flags(state, metrics: dict) -> dict:
  """{"metrics": {name: finite}, "state": {part: finite}} of one step's outputs."""
  return {"metrics": {k: all_finite(v) for k, v in metrics.items()},
          "state": {part: all_finite(getattr(state, part, None)) for part in STATE_PARTS}}


def wrap(train_step: Callable) -> Callable:
  """train_step(state, batch) -> (state, metrics) as one that returns
  (state, (metrics, flags)): the same numbers, plus the flags computed on the device."""

  def guarded(state, batch):
    state, metrics = train_step(state, batch)
    return state, (metrics, flags(state, metrics))

  return guarded


def empty_record(step_flags: dict) -> dict:
  """A record with no bad step yet, shaped like `step_flags`."""
  return {"step": jnp.array(-1, jnp.int32),
          "bad": jax.tree.map(lambda _: jnp.array(False), step_flags)}


def all_true(step_flags: dict) -> jax.Array:
  """Scalar bool: every flag is True."""
  return jnp.all(jnp.stack(jax.tree.leaves(step_flags)))


@jax.jit
def _fold(record: dict, step_flags: dict, step: jax.Array) -> dict:
  new = (record["step"] < 0) & ~all_true(step_flags)
  return {"step": jnp.where(new, step.astype(jnp.int32), record["step"]),
          "bad": jax.tree.map(lambda old, ok: jnp.where(new, ~ok, old), record["bad"],
                              step_flags)}


def update(record: Optional[dict], step_flags: dict, step: jax.Array) -> dict:
  """The record after a step with `step_flags` (None: before the first step); `step` is the
  number of the step just taken (the new state's step). Dispatched asynchronously."""
  return _fold(empty_record(step_flags) if record is None else record, step_flags, step)


def first_bad(record) -> Optional[tuple[int, list]]:
  """(step, what) of a fetched record, None if all was finite: `what` names what was not
  finite at that step, metrics first with losses leading (the first thing to look at), then
  the state parts as STATE_PARTS words them."""
  if record is None or int(record["step"]) < 0:
    return None
  metrics = sorted((k for k, bad in record["bad"]["metrics"].items() if bad),
                   key=lambda k: ("loss" not in k, k))
  parts = [STATE_PARTS[p] for p in STATE_PARTS if record["bad"]["state"].get(p, False)]
  return int(record["step"]), [f"the metric {k!r}" for k in metrics] + parts


def describe(bad: tuple[int, list]) -> str:
  """Says "the metric 'loss' (also ...) became NaN or infinite" of a `first_bad` result."""
  _, what = bad
  also = f" (also {', '.join(what[1:])})" if len(what) > 1 else ""
  return f"{what[0]}{also} became NaN or infinite"
