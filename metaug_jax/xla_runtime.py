"""XLA settings that must be chosen before JAX starts its backend.

`config.xla_cpu_scheduler` picks how XLA:CPU orders a step's operations. "concurrency" is
XLA's default on CPU (independent operations may run side by side); "memory" is its
memory-minimising scheduler. At the paper's setting the memory scheduler cuts the MetAug
step's XLA temp by about a quarter (1504 -> 1121 MiB with model.remat) for a step 6-8% slower
(experiments/results/benchmark_cpu.md). XLA reads this once, from XLA_FLAGS, when the CPU
backend starts; a per-compilation option is accepted but has no effect (checked with
jax 0.10.2), hence this module.

`config.xla_cse=False` turns off XLA's common-subexpression elimination pass ("cse"). XLA:CPU
drops the optimisation barriers that `jax.checkpoint` puts around a recomputation before its
last CSE pass, which then merges the recomputed forward back into the original one: the
forward activations stay alive and `model.remat` saves much less than it should. Without
CSE the recomputation stays (anchor: fused + remat + memory scheduler, XLA temp 1121 -> 863
MiB). Other backends keep the barriers to the end, so there it only costs speed.
"""

import os
import re

from jax._src import xla_bridge

from metaug_jax.config_check import ConfigError

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG_VALUE = {"concurrency": "true", "memory": "false"}
DISABLE_PASSES_FLAG = "xla_disable_hlo_passes"
CSE_PASS = "cse"


def _flag_in_environment():
  """The value XLA_FLAGS gives the scheduler flag ('true'/'false'/...), or None if unset."""
  found = re.findall(rf"--{FLAG}(?:=(\S*))?", os.environ.get("XLA_FLAGS", ""))
  if not found:
    return None
  value = (found[-1] or "true").lower()
  return {"1": "true", "0": "false"}.get(value, value)


def _disabled_passes() -> list:
  """The HLO passes XLA_FLAGS disables (`--xla_disable_hlo_passes=a,b`; the last one wins)."""
  found = re.findall(rf"--{DISABLE_PASSES_FLAG}=(\S*)", os.environ.get("XLA_FLAGS", ""))
  return [p for p in found[-1].split(",") if p] if found else []


def _set_xla_flag(setting: str, flag: str, other_flags: str) -> None:
  """XLA_FLAGS = other_flags + flag, or ConfigError if JAX's backend has already read them."""
  if xla_bridge.backends_are_initialized():
    raise ConfigError(
        f"config.{setting} must be chosen before JAX starts its backend: use the command "
        f"line, or set the environment variable XLA_FLAGS={flag} before the first JAX "
        "computation.")
  os.environ["XLA_FLAGS"] = f"{other_flags} {flag}".strip()


def apply_xla_cpu_scheduler(scheduler: str) -> None:
  """Makes XLA:CPU compile with `scheduler`, or raises ConfigError if it is too late to.

  "concurrency" needs nothing (XLA's default). "memory" is added to XLA_FLAGS if JAX has not
  started a backend yet. An XLA_FLAGS setting that disagrees with the config, or a backend
  already started with the other scheduler, is an error that says what to do.
  """
  if scheduler not in SCHEDULER_FLAG_VALUE:
    return  # config_check.validate reports it
  wanted = SCHEDULER_FLAG_VALUE[scheduler]
  current = _flag_in_environment()
  if current is not None and current != wanted:
    raise ConfigError(
        f"config.xla_cpu_scheduler={scheduler!r} but XLA_FLAGS sets --{FLAG}={current}; "
        f"remove that flag or pass --config.xla_cpu_scheduler="
        f"{'memory' if current == 'false' else 'concurrency'}.")
  if current == wanted or scheduler == "concurrency":
    return
  _set_xla_flag("xla_cpu_scheduler='memory'", f"--{FLAG}=false",
                os.environ.get("XLA_FLAGS", ""))


def apply_xla_cse(enabled: bool) -> None:
  """Disables XLA's CSE pass through XLA_FLAGS when `enabled` is False (before the backend).

  True (XLA's default) needs nothing, unless XLA_FLAGS already disables the pass: that
  disagreement is an error, as is asking for False after the backend started.
  """
  disabled = _disabled_passes()
  if enabled:
    if CSE_PASS in disabled:
      raise ConfigError(
          f"config.xla_cse=True but XLA_FLAGS disables the '{CSE_PASS}' pass "
          f"(--{DISABLE_PASSES_FLAG}); remove it or pass --config.xla_cse=False.")
    return
  if CSE_PASS in disabled:
    return
  others = re.sub(rf"\s*--{DISABLE_PASSES_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
  _set_xla_flag("xla_cse=False", f"--{DISABLE_PASSES_FLAG}={','.join(disabled + [CSE_PASS])}",
                others)


def apply_config(config) -> None:
  """Applies every process-level XLA setting of `config` (call before any JAX computation)."""
  apply_xla_cpu_scheduler(config.xla_cpu_scheduler)
  apply_xla_cse(config.xla_cse)
