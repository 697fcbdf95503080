"""XLA settings that must be chosen before JAX starts its backend.

`config.xla_cpu_scheduler` picks how XLA:CPU orders a step's operations. "concurrency" is
XLA's default on CPU (independent operations may run side by side); "memory" is its
memory-minimising scheduler. At the paper's setting the memory scheduler cuts the MetAug
step's XLA temp by about a quarter (1504 -> 1121 MiB with model.remat) for a step 6-8% slower
(experiments/results/benchmark_cpu.md). XLA reads this once, from XLA_FLAGS, when the CPU
backend starts; a per-compilation option is accepted but has no effect (checked with
jax 0.10.2), hence this module.
"""

import os
import re

from jax._src import xla_bridge

from metaug_jax.config_check import ConfigError

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG_VALUE = {"concurrency": "true", "memory": "false"}


def _flag_in_environment():
  """The value XLA_FLAGS gives the scheduler flag ('true'/'false'/...), or None if unset."""
  found = re.findall(rf"--{FLAG}(?:=(\S*))?", os.environ.get("XLA_FLAGS", ""))
  if not found:
    return None
  value = (found[-1] or "true").lower()
  return {"1": "true", "0": "false"}.get(value, value)


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
  if xla_bridge.backends_are_initialized():
    raise ConfigError(
        "config.xla_cpu_scheduler='memory' must be chosen before JAX starts its backend: use "
        "the command line, or set the environment variable "
        f"XLA_FLAGS=--{FLAG}=false before the first JAX computation.")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{FLAG}=false".strip()
