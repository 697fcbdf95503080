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
MiB). Other backends keep the barriers to the end, so there it only costs speed. This is
jaxlib 0.10's XLA:CPU: jaxlib 0.11 keeps the recomputation with CSE on (checked with 0.11.2,
tests/test_runtime.py), so there the switch is not needed.

`config.xla_cpu_conv_library="eigen"` (the default) keeps XLA:CPU's convolutions out of
YNNPACK, which jaxlib 0.10-0.11 use for them by default, so they run on XLA's Eigen kernels.
On a 2-core AMD EPYC, Eigen's weight and input gradients of AlexNet-half's convs 2-5 ran at
152-194 GFLOP/s against 79-173 for YNNPACK's (forward passes differ less), and the paper's
MetAug step takes ~27% less time: 8.2 against 11.4 s/step, 6.1 against 8.5 fused
(experiments/results/conv_layers_cpu.md, benchmark_cpu.md).
Only convolutions move; dots and reductions stay where XLA puts them. It is a speed setting
(results differ at float rounding), so applying it too late is a warning, not an error.

XLA refuses to start when XLA_FLAGS holds a flag its build does not know, so one renamed flag
in a new jaxlib would stop every run. Each flag is therefore written only on the jaxlib
versions it was checked on (`CHECKED_JAXLIB`) or, on any other, after a probe in a throw-away
interpreter accepted it; and only when the run's platform is the CPU. Otherwise the setting is
skipped with one info line, and the run goes on with XLA's defaults.
"""

import functools
import importlib.metadata
import os
import re
import subprocess
import sys

from absl import logging
import jax

from metaug_jax.config_check import ConfigError

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG_VALUE = {"concurrency": "true", "memory": "false"}
DISABLE_PASSES_FLAG = "xla_disable_hlo_passes"
CSE_PASS = "cse"
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_CONVOLUTION = "individual_convolution"
_warned_conv_library_too_late = False


def _flag_in_environment():
  """The value XLA_FLAGS gives the scheduler flag ('true'/'false'/...), or None if unset."""
  found = re.findall(rf"--{FLAG}(?:=(\S*))?", os.environ.get("XLA_FLAGS", ""))
  if not found:
    return None
  value = (found[-1] or "true").lower()
  return {"1": "true", "0": "false"}.get(value, value)


def _flag_list(flag: str):
  """The comma-separated entries XLA_FLAGS gives `--flag=a,b` (the last one wins), or None
  when the flag is absent."""
  found = re.findall(rf"--{flag}=(\S*)", os.environ.get("XLA_FLAGS", ""))
  return [e.strip() for e in found[-1].split(",") if e.strip()] if found else None


def without_flag(flag: str) -> str:
  """XLA_FLAGS with every `--flag=...` removed."""
  return re.sub(rf"\s*--{flag}=\S*", "", os.environ.get("XLA_FLAGS", "")).strip()


def _disabled_passes() -> list:
  """The HLO passes XLA_FLAGS disables (`--xla_disable_hlo_passes=a,b`)."""
  return _flag_list(DISABLE_PASSES_FLAG) or []


# jaxlib (major.minor) versions on which each flag was checked: accepted, and doing what the
# docstring says (0.10.2 here; 0.11.2 on a lent H200 host, tests/test_runtime.py).
CHECKED_JAXLIB = {FLAG: ("0.10",), DISABLE_PASSES_FLAG: ("0.10", "0.11"),
                  YNN_FUSION_FLAG: ("0.10", "0.11")}
# Options whose validator refuses a change once a backend exists: a public way (jax.config) to
# ask whether JAX's backend has started. The first that this jax defines is used.
_STARTED_PROBES = ("jax_cpu_get_local_topology_timeout_minutes", "jax_num_cpu_devices")
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
_noted = set()


def jaxlib_version() -> str:
  """The installed jaxlib's version (read from its metadata: starts nothing)."""
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return jax.__version__


def _minor(version: str) -> str:
  return ".".join(version.split(".")[:2])


@functools.lru_cache(maxsize=None)
def flag_accepted(flag: str, value: str) -> bool:
  """Whether this jaxlib's XLA starts with `--flag=value`: known on CHECKED_JAXLIB versions,
  else probed once in a fresh interpreter (XLA aborts there on an unknown flag)."""
  if _minor(jaxlib_version()) in CHECKED_JAXLIB.get(flag, ()):
    return True
  env = dict(os.environ, XLA_FLAGS=f"--{flag}={value}", JAX_PLATFORMS="cpu")
  code = "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
  try:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          timeout=300, check=False).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def backend_started() -> bool:
  """Whether JAX has started a backend (after which XLA_FLAGS is no longer read)."""
  for name in _STARTED_PROBES:
    try:
      value = getattr(jax.config, name)
    except AttributeError:
      continue
    try:
      jax.config.update(name, value + 1)
    except RuntimeError:
      return True
    jax.config.update(name, value)
    return False
  return False  # unknown on this jax: assume not, so the settings are at least attempted


def _accelerator_platform():
  """The accelerator the run will use instead of the CPU ('gpu', 'tpu', ...), or None."""
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms:
    first = platforms.split(",")[0].strip().lower()
    return None if first == "cpu" else first
  names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
  plugin = next((n for n in sorted(names) if n.startswith(_ACCELERATOR_PLUGINS)), None)
  return f"an accelerator ({plugin} is installed)" if plugin else None


def note_once(message: str) -> None:
  """Prints 'info: message' to stderr, once per process and message."""
  if message not in _noted:
    _noted.add(message)
    print(f"info: {message}", file=sys.stderr, flush=True)


def cpu_flag_applicable(setting: str, flag: str, value: str) -> bool:
  """Whether `--flag=value` should be written for `setting`: the run is on the CPU and this
  jaxlib accepts the flag; otherwise one info line says why it is skipped."""
  accelerator = _accelerator_platform()
  if accelerator:
    note_once(f"config.{setting} not applied: it tunes XLA:CPU and this run uses "
              f"{accelerator}.")
    return False
  if not flag_accepted(flag, value):
    note_once(f"config.{setting} not applied: jaxlib {jaxlib_version()} was not checked with "
              f"--{flag} (checked: {', '.join(CHECKED_JAXLIB.get(flag, ())) or 'none'}) and "
              f"refused it in a probe; XLA's default is used.")
    return False
  return True


def _set_xla_flag(setting: str, flag: str, other_flags: str) -> None:
  """XLA_FLAGS = other_flags + flag, or ConfigError if JAX's backend has already read them."""
  if backend_started():
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
  if not cpu_flag_applicable("xla_cpu_scheduler='memory'", FLAG, "false"):
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
  if not cpu_flag_applicable("xla_cse=False", DISABLE_PASSES_FLAG, CSE_PASS):
    return
  _set_xla_flag("xla_cse=False", f"--{DISABLE_PASSES_FLAG}={','.join(disabled + [CSE_PASS])}",
                without_flag(DISABLE_PASSES_FLAG))


def _ynn_fusion_types():
  """The entries XLA_FLAGS gives YNNPACK's fusion types, lower-cased, or None when XLA_FLAGS
  leaves them at XLA's default."""
  entries = _flag_list(YNN_FUSION_FLAG)
  return None if entries is None else [e.lower() for e in entries]


def _names_convolution(entry: str) -> bool:
  return entry.lstrip("+-").removeprefix("library_fusion_type_") == YNN_CONVOLUTION


def _gives_ynnpack_convolutions(entries) -> bool:
  """Whether the entries name convolutions without removing them ('x' or '+x', not '-x')."""
  return any(_names_convolution(e) and not e.startswith("-") for e in entries)


def cpu_convolutions_use_eigen() -> bool:
  """Whether XLA_FLAGS keeps XLA:CPU's convolutions off YNNPACK (so on Eigen's kernels).

  Entries that all start with '-' or '+' edit XLA's default list, in which convolutions are
  (jaxlib 0.10-0.11); any other entry makes the list explicit. An empty list is no YNNPACK.
  """
  entries = _ynn_fusion_types()
  if entries is None:
    return False
  if entries and all(e.startswith(("-", "+")) for e in entries):
    return any(e.startswith("-") and _names_convolution(e) for e in entries)
  return not _gives_ynnpack_convolutions(entries)


def apply_xla_cpu_conv_library(library: str) -> None:
  """Puts XLA:CPU's convolutions on Eigen's kernels (library "eigen") through XLA_FLAGS.

  "xla_default" leaves XLA's choice alone. For "eigen": nothing to do if XLA_FLAGS already
  keeps convolutions off YNNPACK; an XLA_FLAGS list that names them is an error that says what
  to do; once the CPU backend has started, a warning (once per process) says how to get the
  faster kernels, and the run goes on with XLA's.
  """
  global _warned_conv_library_too_late
  if library != "eigen" or cpu_convolutions_use_eigen():
    return  # "xla_default", an unknown name (config_check.validate reports it) or done
  entries = _ynn_fusion_types()
  if entries and _gives_ynnpack_convolutions(entries):
    raise ConfigError(
        f"config.xla_cpu_conv_library='eigen' but XLA_FLAGS gives YNNPACK the convolutions "
        f"(--{YNN_FUSION_FLAG}={','.join(entries)}); remove '{YNN_CONVOLUTION}' from it or "
        "pass --config.xla_cpu_conv_library=xla_default.")
  if backend_started():
    if jax.default_backend() == "cpu" and not _warned_conv_library_too_late:
      _warned_conv_library_too_late = True
      logging.warning(
          "config.xla_cpu_conv_library='eigen' not applied: JAX's backend had already "
          "started, so XLA:CPU keeps its default convolution kernels (CPU training steps "
          "measured up to 1.4x longer). Set XLA_FLAGS=--%s=-%s before the first JAX "
          "computation, or pass --config.xla_cpu_conv_library=xla_default to silence this.",
          YNN_FUSION_FLAG, YNN_CONVOLUTION)
    return
  value = ",".join((entries or []) + [f"-{YNN_CONVOLUTION}"])
  if not cpu_flag_applicable("xla_cpu_conv_library='eigen'", YNN_FUSION_FLAG, value):
    return
  os.environ["XLA_FLAGS"] = f"{without_flag(YNN_FUSION_FLAG)} --{YNN_FUSION_FLAG}={value}".strip()


def apply_config(config) -> None:
  """Applies every process-level XLA setting of `config` (call before any JAX computation)."""
  apply_xla_cpu_scheduler(config.xla_cpu_scheduler)
  apply_xla_cse(config.xla_cse)
  apply_xla_cpu_conv_library(config.xla_cpu_conv_library)
