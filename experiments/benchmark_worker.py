"""The benchmark's worker: one setting measured in its own process, and the machine's facts.

`run_in_subprocess(setting)` starts this file in a fresh interpreter
(`python experiments/benchmark_worker.py SETTING_JSON`), so that the process's peak RSS belongs
to that setting alone; `worker_main` there builds the setting's step, compiles and times it, and
prints the result as one tagged JSON line.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

from benchmark_plan import ANCHOR, ENCODERS, STEP_VARIANTS, Setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "BENCH_RESULT "


def make_config(setting: Setting):
  """The config of a setting: the digits quick-start, or the paper's settings (docs/metaug.md
  §5.4)."""
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import digits  # pylint: disable=g-import-not-at-top  (configs/digits.py)
  from metaug_jax import config_base  # pylint: disable=g-import-not-at-top
  from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
  if setting.encoder == "digits_conv":
    c = digits.get_config()
  elif setting.encoder == "alexnet_half":
    c = config_base.paper_config("cifar10")              # 224x224, lab views, K=1024
  elif setting.encoder in ("alexnet_small", "resnet18"):
    c = config_base.paper_config("cifar10", "small")     # 32x32, lab views, K=1024
    c.model.encoder = setting.encoder
  else:
    raise ValueError(f"unknown encoder {setting.encoder!r}; choose from {ENCODERS}")
  method, variant_overrides = STEP_VARIANTS.get(setting.method, (setting.method, ()))
  registry.apply_variant(c, method)   # e.g. one shared encoder for simclr and the Siamese ones
  c.batch_size = setting.batch
  c.num_devices = setting.num_devices
  c.metaug.algorithm = "paper"
  c.num_train_steps = 10 ** 6
  c.progress_bar = False
  c.update_from_flattened_dict(dict(variant_overrides))
  c.update_from_flattened_dict(dict(setting.overrides))
  return c


def synthetic_dataset(encoder: str, seed: int = 0):
  """uint8 noise images shaped like the encoder's data (see the module docstring)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metaug_jax.data import sources  # pylint: disable=g-import-not-at-top
  shape = (1437, 8, 8, 1) if encoder == "digits_conv" else (ANCHOR["bank_rows"], 32, 32, 3)
  images = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
  return sources.ImageDataset(name=f"synthetic{shape[1:]}", pretrain_images=images,
                              train_images=images, train_labels=None, test_images=None,
                              test_labels=None, num_classes=None)


def rss_mib() -> float:
  """Current resident set size of this process (Linux /proc), MiB; nan elsewhere."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
  except (OSError, ValueError):
    return float("nan")


def peak_rss_mib() -> float:
  """Peak RSS of this process so far (ru_maxrss: KiB on Linux, bytes on macOS), MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def compiled_facts(compiled) -> dict:
  """XLA's flop count and memory analysis of a compiled executable (None where absent)."""
  out = {"gflops": None, "temp_mib": None, "argument_mib": None, "output_mib": None,
         "alias_mib": None}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      out["gflops"] = float(cost["flops"]) / 1e9
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    pass
  try:
    mem = compiled.memory_analysis()
    mem = mem[0] if isinstance(mem, (list, tuple)) else mem
    if mem is not None:
      for name in ("temp", "argument", "output", "alias"):
        out[f"{name}_mib"] = getattr(mem, f"{name}_size_in_bytes") / 2 ** 20
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def device_memory(devices) -> Optional[dict]:
  """Peak / in-use bytes of the first device, from `memory_stats()` (None on CPU)."""
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if not stats:
    return None
  keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keep if k in stats}


def cpu_seconds() -> float:
  """User + system CPU time of this process (all its threads) so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_calls(fn, args_for_call, warmup: int, steps: int, threaded_state: bool):
  """Runs fn warmup + steps times.

  Returns (first-call seconds, timed seconds list, cores used, last output): `cores used` is
  the process's CPU time over the wall time of the timed calls, i.e. how many cores the step
  actually got (on a shared machine, fewer than it would use alone).
  With threaded_state, fn(state, batch) -> (state, metrics) and the state is carried from
  call to call (the donated input is never reused); otherwise fn(state, batch) is called with
  the same state each time.
  """
  import jax  # pylint: disable=g-import-not-at-top
  state, batches = args_for_call
  times, out, cpu_start = [], None, 0.0
  for i in range(warmup + steps):
    if i == warmup:
      cpu_start = cpu_seconds()
    batch = batches[i % len(batches)]
    start = time.perf_counter()
    out = fn(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
    if threaded_state:
      state = out[0]
  cores = (cpu_seconds() - cpu_start) / max(sum(times[warmup:]), 1e-9)
  return times[0], times[warmup:], cores, out


def aot_compile(fn, *args):
  """(lower seconds, compile seconds, compiled executable) of a pmapped function."""
  start = time.perf_counter()
  lowered = fn.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return lowered_at - start, time.perf_counter() - lowered_at, compiled


def run_step_setting(setting: Setting) -> dict:
  """Compiles and times the real train step of a setting (kinds steps, anchor, scaling)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metaug_jax import host_memory, parallel, train  # pylint: disable=g-import-not-at-top
  config = make_config(setting)
  dataset = synthetic_dataset(setting.encoder)
  exp = train.build_experiment(config, dataset=dataset)
  state = exp.init_state()
  jax.block_until_ready(state)
  batches = [exp.loader.batch_at(s) for s in range(min(setting.warmup + setting.steps, 4))]
  # As train.compile_step: freed host memory released before and after compiling.
  step_fn = parallel.pmap_step(exp.method.train_step, exp.devices)
  host_memory.release()
  rss_before = rss_mib()
  lower_s, compile_s, compiled = aot_compile(step_fn, state, batches[0])
  peak_after_compile = peak_rss_mib()
  host_memory.release()
  first_s, times, cores, (state, metrics) = time_calls(
      compiled, (state, batches), setting.warmup, setting.steps, threaded_state=True)
  metrics = jax.device_get(metrics)
  loss = float(metrics.get("loss", metrics.get("loss_total", float("nan"))))
  step_s = statistics.median(times)
  return {
      "platform": exp.devices[0].platform, "device_kind": exp.devices[0].device_kind,
      "views": len(exp.method.facts.view_channels), "input_size": int(config.data.input_size),
      "negatives": int(config.bank.num_negatives),
      "bank_rows": int(dataset.pretrain_images.shape[0]), "algorithm": config.metaug.algorithm,
      "lower_s": lower_s, "compile_s": compile_s, "first_step_s": first_s,
      "step_times_s": times, "step_s": step_s, "cores_used": cores,
      "steps_per_s": 1.0 / step_s,
      "images_per_s": setting.batch / step_s, "final_loss": loss,
      "finite": bool(np.isfinite(loss)),
      **compiled_facts(compiled),
      "device_memory": device_memory(exp.devices),
      "rss_before_step_mib": rss_before, "peak_rss_after_compile_mib": peak_after_compile,
      "peak_rss_mib": peak_rss_mib(),
  }


def metaug_parts(method, config):
  """Pure functions (state, batch) for the parts of one MetAug step, each pmappable.

  views   the augmented views alone;
  phase_a Phase A: grad over the encoders of L_total with the MAGs frozen (docs/metaug.md
          §5.1), pmean (`meta_gradient.phase_a`);
  phase_b Phase B: the MAG meta-gradient through the virtual encoder step (second order,
          `MetaFeatureGenerators.outer_gradient`, as configured: forward-over-reverse or
          double backward), both parts, pmean.
  The optimiser updates and the bank update are what the full step adds to phase_a + phase_b.
  """
  from metaug_jax import meta_gradient  # pylint: disable=g-import-not-at-top
  from metaug_jax.methods import common, metaug  # pylint: disable=g-import-not-at-top
  if method.strategy.startswith("fused"):
    raise ValueError("the parts section times the paper-aligned step, whose Phase B stands "
                     "alone; drop metaug.virtual_step_from=current")

  def views(state, batch):
    keys = common.step_keys(state, ("augment",))
    return common.train_views(batch["image"], keys["augment"], config.data)

  def phase_a(state, batch):
    objective = method.objective(state, metaug.step_inputs(method, state, batch))
    result = meta_gradient.phase_a(objective, state.params["encoder"], state.params["mag"],
                                   state.banks)
    return result.aux.metrics["loss_total"], result.grad

  def phase_b(state, batch):
    objective = method.objective(state, metaug.step_inputs(method, state, batch))
    theta = state.params["encoder"]
    grads, metrics = meta_gradient.combine(method.generators.outer_gradient(
        objective, theta, theta, state.params["mag"], state.banks))
    return metrics["meta_loss"], grads

  return {"views": views, "phase_a": phase_a, "phase_b": phase_b}


def run_parts_setting(setting: Setting) -> dict:
  """Times each part of a MetAug step alone (compiled separately), then the full step."""
  import jax  # pylint: disable=g-import-not-at-top
  from metaug_jax import parallel, train  # pylint: disable=g-import-not-at-top
  config = make_config(setting)
  exp = train.build_experiment(config, dataset=synthetic_dataset(setting.encoder))
  state = exp.init_state()
  batches = [exp.loader.batch_at(s) for s in range(2)]
  parts = {}
  for name, fn in metaug_parts(exp.method, config).items():
    mapped = jax.pmap(fn, axis_name=parallel.AXIS, in_axes=(None, 0), devices=exp.devices)
    lower_s, compile_s, compiled = aot_compile(mapped, state, batches[0])
    _, times, cores, _ = time_calls(compiled, (state, batches), setting.warmup, setting.steps,
                                    threaded_state=False)
    parts[name] = {"compile_s": lower_s + compile_s, "step_s": statistics.median(times),
                   "cores_used": cores, **compiled_facts(compiled)}
    del compiled
  full = run_step_setting(setting)
  parts["full_step"] = {"compile_s": full["lower_s"] + full["compile_s"],
                        "step_s": full["step_s"], "gflops": full["gflops"],
                        "cores_used": full["cores_used"],
                        "temp_mib": full["temp_mib"]}
  return {"parts": parts, "peak_rss_mib": peak_rss_mib(), "platform": full["platform"]}


def worker_main(setting: Setting) -> None:
  """Runs one setting and prints its result as one tagged JSON line."""
  start = time.perf_counter()
  runner = run_parts_setting if setting.kind == "parts" else run_step_setting
  result = runner(setting)
  result["wall_s"] = time.perf_counter() - start
  print(RESULT_TAG + json.dumps(result), flush=True)


# ---- the driver's side: a setting's subprocess, and the machine it runs on ----------------


def worker_env(setting: Setting) -> dict:
  """The environment of a setting's subprocess: its own simulated-device count, or none."""
  env = dict(os.environ)
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # the tests' speed-up; measure real code
  # The setting's config alone decides the device count and XLA:CPU's conv kernels.
  dropped = ("--xla_force_host_platform_device_count", "--xla_cpu_experimental_ynn_fusion_type")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(dropped)]
  if setting.simulated:
    flags.append(f"--xla_force_host_platform_device_count={setting.num_devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # honest GPU peak, shared GPU
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
  return env


def run_in_subprocess(setting: Setting, timeout_s: float) -> dict:
  """Runs `setting` in a fresh interpreter; its result, or {'error': ...}."""
  cmd = [sys.executable, os.path.abspath(__file__), setting.to_json()]
  try:
    proc = subprocess.run(cmd, env=worker_env(setting), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
  return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def probe_platform() -> dict:
  """Default backend and device count, asked of a subprocess (the driver never starts jax)."""
  code = ("import jax, json; d = jax.devices(); "
          "print(json.dumps({'platform': d[0].platform, 'count': len(d), "
          "'kind': d[0].device_kind, 'jax': jax.__version__}))")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def machine_load() -> dict:
  """Load average and the other busy processes (the CPU may be shared), for the record."""
  info = {"loadavg": None, "busy_processes": []}
  try:
    info["loadavg"] = open("/proc/loadavg").read().split()[:3]
  except OSError:
    pass
  try:
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,etime,args", "--sort=-pcpu"],
                        capture_output=True, text=True, check=True).stdout.splitlines()
    me = os.getpid()
    for line in ps[1:]:
      parts = line.split(None, 4)
      if len(parts) == 5 and float(parts[1]) >= 10.0 and int(parts[0]) != me:
        info["busy_processes"].append(f"pid {parts[0]}, {parts[1]}% CPU, "
                                      f"{int(parts[2]) // 1024} MiB: {parts[4][:110]}")
  except (OSError, ValueError, subprocess.CalledProcessError):
    pass
  return info


if __name__ == "__main__":
  sys.path.insert(0, ROOT)  # the repository's metaug_jax, installed or not
  worker_main(Setting.from_json(sys.argv[1]))
