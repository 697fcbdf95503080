"""Step-time, compile-time and memory benchmark of the contrastive steps, side by side.

One command measures every setting (encoder x batch x step), each in a fresh subprocess so
that the process's peak RSS belongs to that setting alone, and writes one markdown table and
one JSON file:

  python experiments/benchmark.py --md_out=experiments/results/benchmark_cpu.md \
      --json_out=experiments/results/benchmark_cpu.json

  python experiments/benchmark.py --only=anchor --json_out=/tmp/anchor.json   # paper anchor
  python experiments/benchmark.py --only=steps --encoders=digits_conv --steps=3  # quick look
  python experiments/benchmark.py --only=anchor --methods=cmc,metaug_fused  # some steps only

Sections (`--only`, comma-separated; default all):
  steps    each encoder at a few batch sizes: `cmc` (the plain contrastive step; also
           `simclr` for the digits encoder), `metaug_oucl_only`, `metaug` (the paper-ordered
           step, our default), `metaug_fused` (virtual step from the current weights, so
           Phase A's gradient is the inner one) and `metaug_double_backward` (the
           meta-gradient as jax.grad of jax.grad instead of forward-over-reverse), 1 device;
           also `cmc_ynnpack` and `metaug_fused_ynnpack`, the same steps with XLA:CPU's
           convolutions on the jaxlib's default kernels (YNNPACK in jaxlib 0.10-0.11) rather
           than on Eigen's (`config.xla_cpu_conv_library`, default "eigen");
  anchor   the paper's setting (three AlexNet-half encoders at 224x224, batch 64, K=1024
           negatives, a bank of N=5000 rows, `metaug.algorithm=paper`) next to the authors'
           PyTorch numbers on a 2-core machine; also `metaug_fused_remat` (model.remat),
           `metaug_lean` and `metaug_fused_lean` (model.remat and xla_cpu_scheduler=memory),
           `metaug_fused_lean_nocse` (the same with xla_cse=False, so that XLA:CPU keeps
           the rematerialisation), and the `_ynnpack` steps (jaxlib's default conv kernels);
  scaling  one global batch on 1, 2, 4, 8 devices (simulated CPU devices when there is no
           accelerator: those share the same cores, so this measures overhead, not speed-up);
  parts    where a MetAug step's time goes: the views, Phase A (encoder step objective with
           the MAGs frozen) and Phase B (the second-order MAG meta-gradient), each compiled
           and timed alone, next to the full step;
  methods  every registered method (metaug_jax/methods/, the paper's baselines included) on
           the digits encoder and the 32x32 AlexNet, each with its config variant (the
           Siamese baselines: two RGB crops through one shared encoder), with its step time
           and memory as a ratio to the plain `cmc` step on the same encoder and batch.

Per setting: lower and compile time of the pmapped step (`.lower().compile()`; the compiled
executable is what runs afterwards, so nothing compiles twice), the median seconds per step
over `--steps` timed steps after `--warmup` untimed ones (each `jax.block_until_ready`),
steps/s and images/s, XLA's flop count and `memory_analysis()` (temp / argument bytes of the
compiled step), `device.memory_stats()` where the backend has it (GPU/TPU), and the worker
process's peak RSS (`ru_maxrss`) with its RSS before the step was built. Like the training
loop (`train.compile_step`), the worker releases freed host memory (`host_memory.release`)
before and after compiling; the XLA settings (`xla_cpu_scheduler`, `xla_cse`,
`xla_cpu_conv_library`) are applied by `train.build_experiment` before JAX starts its
backend, from the setting's config alone (a conv-kernel choice in XLA_FLAGS is dropped).

The data are synthetic uint8 images of the right shape (no download): 1437 8x8 grey images
for the digits encoder (the size of the digits training split), 5000 32x32 RGB images
otherwise (upsampled to 224 by the views for AlexNet-half); the memory bank has one row per
image.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "BENCH_RESULT "

# The authors' PyTorch code on a 2-core CPU machine (the brief's reference measurements).
PAPER = {
    "metaug": {"s_per_step": 11.98, "images_per_s": 5.3, "peak_rss_gib": 4.5},
    "metaug_oucl_only": {"s_per_step": 1.78, "images_per_s": 36.0, "peak_rss_gib": 1.6},
    "ratio": 7.25,
}

ENCODERS = ("digits_conv", "alexnet_small", "resnet18", "alexnet_half")
DEFAULT_BATCHES = {"digits_conv": (64, 128, 256), "alexnet_small": (32, 64),
                   "resnet18": (32,), "alexnet_half": (64,)}
PLAIN_METHODS = {"digits_conv": ("simclr", "cmc")}  # others: ("cmc",)
# Named steps that are a method plus config overrides. "metaug" itself is the default,
# paper-ordered step (docs/metaug.md §5.1) with the forward-over-reverse meta-gradient.
STEP_VARIANTS = {
    # The virtual step starts from the current theta, so Phase A's gradient is the inner one.
    "metaug_fused": ("metaug", (("metaug.virtual_step_from", "current"),)),
    # The meta-gradient as jax.grad of jax.grad (double backward), the earlier default.
    "metaug_double_backward": ("metaug", (("metaug.meta_gradient", "reverse"),)),
    # The fused step with rematerialised conv blocks (memory for compute).
    "metaug_fused_remat": ("metaug", (("metaug.virtual_step_from", "current"),
                                      ("model.remat", True))),
    # The leanest steps: rematerialised blocks and XLA:CPU's memory-minimising scheduler.
    "metaug_lean": ("metaug", (("model.remat", True), ("xla_cpu_scheduler", "memory"))),
    "metaug_fused_lean": ("metaug", (("metaug.virtual_step_from", "current"),
                                     ("model.remat", True), ("xla_cpu_scheduler", "memory"))),
    # ... and without XLA's CSE pass, which on CPU merges the recomputation into the forward.
    "metaug_fused_lean_nocse": ("metaug", (("metaug.virtual_step_from", "current"),
                                           ("model.remat", True),
                                           ("xla_cpu_scheduler", "memory"), ("xla_cse", False))),
}
# The same steps with XLA:CPU's convolutions where the jaxlib puts them (YNNPACK in jaxlib
# 0.10-0.11) instead of on Eigen's kernels (config.xla_cpu_conv_library, our default "eigen").
_DEFAULT_CONVS = ("xla_cpu_conv_library", "xla_default")
STEP_VARIANTS.update({
    "cmc_ynnpack": ("cmc", (_DEFAULT_CONVS,)),
    "metaug_oucl_only_ynnpack": ("metaug_oucl_only", (_DEFAULT_CONVS,)),
    "metaug_ynnpack": ("metaug", (_DEFAULT_CONVS,)),
    "metaug_fused_ynnpack": ("metaug", (("metaug.virtual_step_from", "current"),
                                        _DEFAULT_CONVS)),
})
STEP_METHODS = ("metaug_oucl_only", "metaug", "metaug_fused", "metaug_double_backward")
YNNPACK_STEP_METHODS = ("cmc_ynnpack", "metaug_fused_ynnpack")
ANCHOR_EXTRA_METHODS = ("metaug_fused_remat", "metaug_lean", "metaug_fused_lean",
                        "metaug_fused_lean_nocse", "metaug_oucl_only_ynnpack", "metaug_ynnpack",
                        "metaug_fused_ynnpack", "cmc_ynnpack")
ANCHOR = {"encoder": "alexnet_half", "batch": 64, "negatives": 1024, "bank_rows": 5000}
METHODS_SETTINGS = (("digits_conv", 128), ("alexnet_small", 64))  # the methods section


@dataclasses.dataclass(frozen=True)
class Setting:
  """One measurement: which step, on which encoder, batch and number of devices."""
  kind: str              # steps | anchor | scaling | parts
  encoder: str
  method: str
  batch: int
  num_devices: int = 1
  simulated: bool = False  # simulated CPU devices (XLA_FLAGS) rather than real ones
  warmup: int = 1
  steps: int = 5
  overrides: tuple = ()    # (("metaug.first_order", True), ...) applied to the config

  @property
  def key(self) -> str:
    """Unique per measurement, overrides included (so --resume never mixes two configs)."""
    base = f"{self.kind}:{self.encoder}:{self.method}:b{self.batch}:d{self.num_devices}"
    return base + "".join(f":{k}={v}" for k, v in self.overrides)

  @property
  def label(self) -> str:
    """The step's name in the tables: the method, with any config overrides."""
    return self.method + _overrides_suffix(self.overrides)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "Setting":
    d = json.loads(text)
    d["overrides"] = tuple(tuple(o) for o in d.get("overrides", ()))
    return cls(**d)


# ---- the worker: one setting, in its own process ------------------------------------------


def _overrides_suffix(overrides) -> str:
  """' [key=value]' per config override, for table labels."""
  return "".join(f" [{k}={v}]" for k, v in overrides)


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
          §5.1), pmean;
  phase_b Phase B: the MAG meta-gradient through the virtual encoder step (second order,
          `MetAug.paper_meta_gradient`, as configured: forward-over-reverse or double
          backward), both paths, pmean.
  The optimiser updates and the bank update are what the full step adds to phase_a + phase_b.
  """
  from metaug_jax import parallel  # pylint: disable=g-import-not-at-top
  from metaug_jax.methods import common  # pylint: disable=g-import-not-at-top

  def prepare(state, batch, names):
    keys = common.step_keys(state, ("augment",) + names)
    views = common.train_views(batch["image"], keys["augment"], config.data)
    draws = {n: method.draw_call_indices(keys[n], batch["index"]) for n in names}
    return views, parallel.gather_rows(batch["index"]), draws

  def views(state, batch):
    keys = common.step_keys(state, ("augment",))
    return common.train_views(batch["image"], keys["augment"], config.data)

  def phase_a(state, batch):
    views_, global_index, draws = prepare(state, batch, ("phase_a",))
    grads, _, _, _, (_, _, _, metrics) = method.linearized_encoder_gradient(
        state, views_, state.params["encoder"], state.banks, draws["phase_a"], global_index,
        update_stats=True)
    return metrics["loss_total"], grads

  def phase_b(state, batch):
    views_, global_index, draws = prepare(state, batch, ("inner", "outer"))
    grads, metrics, _ = method.paper_meta_gradient(state, views_, draws.get, global_index)
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


# ---- the driver: settings, subprocesses, tables -------------------------------------------


def plain_methods(encoder: str) -> tuple:
  return PLAIN_METHODS.get(encoder, ("cmc",))


def plan(sections, encoders, batches, steps: int, warmup: int, anchor_steps: int,
         scaling_devices, scaling_encoder: str, scaling_batch: int, scaling_methods,
         accelerator_count: int, overrides: tuple = ()) -> list:
  """The list of settings to measure, in the order they run."""
  todo = []
  if "steps" in sections:
    for encoder in encoders:
      if encoder == ANCHOR["encoder"]:
        continue  # measured once, by the anchor section
      for batch in batches.get(encoder, DEFAULT_BATCHES[encoder]):
        for method in plain_methods(encoder) + STEP_METHODS + YNNPACK_STEP_METHODS:
          todo.append(Setting("steps", encoder, method, batch, warmup=warmup, steps=steps,
                              overrides=overrides))
  if "anchor" in sections or ("steps" in sections and ANCHOR["encoder"] in encoders):
    for method in ("cmc",) + STEP_METHODS + ANCHOR_EXTRA_METHODS:
      todo.append(Setting("anchor", ANCHOR["encoder"], method, ANCHOR["batch"],
                          warmup=1, steps=anchor_steps, overrides=overrides))
  if "scaling" in sections:
    simulated = accelerator_count <= 1
    counts = scaling_devices if simulated else \
        [n for n in (1, 2, 4, 8, 16) if n <= accelerator_count]
    for method in scaling_methods:
      for n in counts:
        todo.append(Setting("scaling", scaling_encoder, method, scaling_batch, num_devices=n,
                            simulated=simulated, warmup=warmup, steps=steps,
                            overrides=overrides))
  if "methods" in sections:
    from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
    for encoder, batch in METHODS_SETTINGS:
      if encoder in encoders:
        for method in ("cmc",) + tuple(m for m in registry.names() if m != "cmc"):
          todo.append(Setting("methods", encoder, method, batch, warmup=warmup, steps=steps,
                              overrides=overrides))
  if "parts" in sections:
    for encoder in encoders:
      batch = ANCHOR["batch"] if encoder == ANCHOR["encoder"] else \
          max(batches.get(encoder, DEFAULT_BATCHES[encoder]))
      is_anchor = encoder == ANCHOR["encoder"]
      todo.append(Setting("parts", encoder, "metaug", batch, warmup=1,
                          steps=anchor_steps if is_anchor else steps, overrides=overrides))
  return todo


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
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", setting.to_json()]
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


# ---- formatting ---------------------------------------------------------------------------


def _f(value, fmt: str = ".3f", missing: str = "–") -> str:
  return missing if value is None else format(value, fmt)


def _s(seconds, missing: str = "–") -> str:
  """Seconds with three decimals, or three significant digits below 0.1 s (accelerators)."""
  if seconds is None:
    return missing
  return format(seconds, ".3f") if seconds >= 0.1 else format(seconds, ".3g")


def _table_head(head) -> list:
  """A markdown table's header and separator lines."""
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _steps_table(rows) -> list:
  head = ["encoder", "input, views", "batch", "step", "compile s", "s / step", "steps / s",
          "images / s", "cores used", "GFLOP / step", "GFLOP/s", "XLA temp MiB", "XLA args MiB",
          "peak RSS MiB (+ over pre-step)", "device peak MiB"]
  lines = _table_head(head)
  for s, r in rows:
    if "error" in r:
      lines.append(f"| {s.encoder} | | {s.batch} | {s.label} | error: {r['error'][:200]} |")
      continue
    dev = r.get("device_memory") or {}
    peak_dev = dev.get("peak_bytes_in_use")
    lines.append("| " + " | ".join([
        s.encoder, f"{r['input_size']}², {r['views']}", str(s.batch), s.label,
        _f(r["lower_s"] + r["compile_s"], ".1f"), _s(r["step_s"]), _f(r["steps_per_s"], ".2f"),
        _f(r["images_per_s"], ".1f"), _f(r.get("cores_used"), ".2f"), _f(r["gflops"], ".1f"),
        _f(r["gflops"] / r["step_s"] if r["gflops"] else None, ".1f"), _f(r["temp_mib"], ".0f"),
        _f(r["argument_mib"], ".0f"),
        f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['rss_before_step_mib']:.0f})",
        _f(peak_dev / 2 ** 20 if peak_dev else None, ".0f", "n/a")]) + " |")
  return lines


def _ratio_table(rows) -> list:
  by = {}
  for s, r in rows:
    if "error" not in r:
      by.setdefault((s.encoder, s.batch, s.overrides), {})[s.method] = r["step_s"]
  head = ["encoder", "batch", "simclr s", "cmc s", "oucl_only s", "metaug s", "fused s",
          "double-backward s", "**metaug / cmc**", "**fused / cmc**", "double-backward / cmc",
          "metaug / oucl_only", "fused / oucl_only", "oucl_only / cmc",
          "cmc: YNNPACK / Eigen convs", "fused: YNNPACK / Eigen convs"]
  lines = _table_head(head)
  ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "–"
  for (encoder, batch, overrides), t in by.items():
    lines.append("| " + " | ".join([
        encoder + _overrides_suffix(overrides), str(batch), _s(t.get("simclr")),
        _s(t.get("cmc")), _s(t.get("metaug_oucl_only")), _s(t.get("metaug")),
        _s(t.get("metaug_fused")), _s(t.get("metaug_double_backward")),
        "**" + ratio(t.get("metaug"), t.get("cmc")) + "**",
        "**" + ratio(t.get("metaug_fused"), t.get("cmc")) + "**",
        ratio(t.get("metaug_double_backward"), t.get("cmc")),
        ratio(t.get("metaug"), t.get("metaug_oucl_only")),
        ratio(t.get("metaug_fused"), t.get("metaug_oucl_only")),
        ratio(t.get("metaug_oucl_only"), t.get("cmc")),
        ratio(t.get("cmc_ynnpack"), t.get("cmc")),
        ratio(t.get("metaug_fused_ynnpack"), t.get("metaug_fused"))]) + " |")
  return lines


def _methods_table(rows) -> list:
  """A row per method: step time and memory, and their ratios to cmc's on the same setting."""
  cmc = {(s.encoder, s.batch): r for s, r in rows if s.method == "cmc" and "error" not in r}
  head = ["encoder", "batch", "method", "views", "s / step", "step / cmc", "XLA temp MiB",
          "temp / cmc", "peak RSS MiB", "RSS / cmc", "compile s"]
  lines = _table_head(head)
  ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "–"
  for s, r in rows:
    if "error" in r:
      lines.append(f"| {s.encoder} | {s.batch} | {s.label} | error: {r['error'][:200]} |")
      continue
    base = cmc.get((s.encoder, s.batch), {})
    lines.append("| " + " | ".join([
        s.encoder, str(s.batch), s.label, str(r["views"]), _s(r["step_s"]),
        ratio(r["step_s"], base.get("step_s")), _f(r["temp_mib"], ".0f"),
        ratio(r["temp_mib"], base.get("temp_mib")), _f(r["peak_rss_mib"], ".0f"),
        ratio(r["peak_rss_mib"], base.get("peak_rss_mib")),
        _f(r["lower_s"] + r["compile_s"], ".1f")]) + " |")
  return lines


def _anchor_table(rows) -> list:
  got = {s.method: r for s, r in rows if s.kind == "anchor" and "error" not in r}
  head = ["step", "ours s / step", "ours images / s", "ours peak RSS GiB",
          "authors s / step", "authors images / s", "authors peak RSS GiB",
          "ours / authors images/s", "ours / authors peak RSS"]
  lines = _table_head(head)
  for method, label, paper_key in (
      ("metaug", "MetAug (paper step, forward-over-reverse; our default)", "metaug"),
      ("metaug_fused", "MetAug, virtual step from the current theta (fused)", "metaug"),
      ("metaug_double_backward", "MetAug (paper step, jax.grad of jax.grad)", "metaug"),
      ("metaug_fused_remat", "MetAug fused, model.remat=True", "metaug"),
      ("metaug_lean", "MetAug, remat + xla_cpu_scheduler=memory", "metaug"),
      ("metaug_fused_lean", "MetAug fused, remat + xla_cpu_scheduler=memory", "metaug"),
      ("metaug_fused_lean_nocse", "MetAug fused, remat + xla_cpu_scheduler=memory + "
       "xla_cse=False", "metaug"),
      ("metaug_ynnpack", "MetAug (paper step), convs on the jaxlib's default kernels "
       "(YNNPACK)", "metaug"),
      ("metaug_fused_ynnpack", "MetAug fused, convs on the jaxlib's default kernels (YNNPACK)",
       "metaug"),
      ("metaug_oucl_only", "plain 3-view OUCL (metaug_oucl_only)", "metaug_oucl_only"),
      ("metaug_oucl_only_ynnpack", "plain 3-view OUCL, convs on the jaxlib's default kernels "
       "(YNNPACK)", "metaug_oucl_only")):
    r, p = got.get(method), PAPER[paper_key]
    if r is None:
      lines.append(f"| {label} | not measured | | | {p['s_per_step']} | {p['images_per_s']} "
                   f"| ~{p['peak_rss_gib']} | | |")
      continue
    rss = r["peak_rss_mib"] / 1024
    lines.append("| " + " | ".join([
        label, _s(r["step_s"]), _f(r["images_per_s"], ".2f"), _f(rss, ".2f"),
        str(p["s_per_step"]), str(p["images_per_s"]), f"~{p['peak_rss_gib']}",
        f"**{r['images_per_s'] / p['images_per_s']:.2f}x**",
        f"**{rss / p['peak_rss_gib']:.2f}x**"]) + " |")
  theirs_implied = PAPER["metaug"]["s_per_step"] / PAPER["metaug_oucl_only"]["s_per_step"]
  for method in ("metaug",) + tuple(STEP_VARIANTS):
    # A step's own plain OUCL: the one with the same conv kernels.
    plain = "metaug_oucl_only_ynnpack" if method.endswith("_ynnpack") else "metaug_oucl_only"
    if method.startswith("metaug") and method != plain and method in got and plain in got:
      ours = got[method]["step_s"] / got[plain]["step_s"]
      lines.append(f"| {method} / {plain} step time | **{ours:.2f}x** | | | {PAPER['ratio']}x "
                   f"(stated; {theirs_implied:.2f}x from their s / step) | | | | |")
  if "cmc" in got:
    lines.append(f"| (cmc, 3 views, InfoNCE) | {_s(got['cmc']['step_s'])} | "
                 f"{got['cmc']['images_per_s']:.2f} | {got['cmc']['peak_rss_mib'] / 1024:.2f} "
                 f"| | | | | |")
  return lines


def _scaling_table(rows) -> list:
  head = ["step", "encoder", "global batch", "devices", "simulated", "s / step", "images / s",
          "efficiency", "cores used", "compile s", "peak RSS MiB"]
  lines = _table_head(head)
  base = {}
  for s, r in rows:
    if "error" not in r and s.num_devices == 1:
      base[s.method] = r["images_per_s"]
  for s, r in rows:
    if "error" in r:
      lines.append(f"| {s.method} | {s.encoder} | {s.batch} | {s.num_devices} | | error: "
                   f"{r['error'][:200]} |")
      continue
    eff = r["images_per_s"] / base[s.method] / s.num_devices if s.method in base else None
    lines.append("| " + " | ".join([
        s.label, s.encoder, str(s.batch), str(s.num_devices), "yes" if s.simulated else "no",
        _s(r["step_s"]), _f(r["images_per_s"], ".1f"), _f(eff, ".2f"),
        _f(r.get("cores_used"), ".2f"), _f(r["lower_s"] + r["compile_s"], ".1f"),
        _f(r["peak_rss_mib"], ".0f")]) + " |")
  return lines


def _parts_table(rows) -> list:
  head = ["encoder", "batch", "part", "s / call", "share of full step", "GFLOP", "XLA temp MiB",
          "cores used", "compile s"]
  lines = _table_head(head)
  for s, r in rows:
    if "error" in r:
      lines.append(f"| {s.encoder} | {s.batch} | error: {r['error'][:200]} | | | | | |")
      continue
    full = r["parts"]["full_step"]["step_s"]
    for name in ("views", "phase_a", "phase_b", "full_step"):
      p = r["parts"][name]
      lines.append("| " + " | ".join([
          s.encoder, str(s.batch), name, _s(p["step_s"]), f"{p['step_s'] / full:.0%}",
          _f(p.get("gflops"), ".1f"), _f(p.get("temp_mib"), ".0f"),
          _f(p.get("cores_used"), ".2f"), _f(p["compile_s"], ".1f")]) + " |")
  return lines


def render_markdown(results: dict, meta: dict) -> str:
  """The whole report: command, machine, then one table per measured section."""
  rows = [(Setting.from_json(v["setting"]), v["result"]) for v in results.values()]
  pick = lambda *kinds: [(s, r) for s, r in rows if s.kind in kinds]
  on_cpu = meta["platform"]["platform"] == "cpu"
  out = [f"# Step-time benchmark ({meta['platform']['platform']}, "
         f"{meta['platform']['kind']})", "",
         "Command (one run; every setting in its own subprocess):", "",
         f"```\n{meta['command']}\n```", "",
         f"jax {meta['platform']['jax']}, {meta['cpus']} CPU cores, python "
         f"{meta.get('python', platform.python_version())}; started {meta['started']}, took "
         f"{meta.get('wall_min', 0):.0f} min." + (f" {meta['note']}" if meta.get("note") else ""),
         "",
         "Machine load (the CPU is shared; timings are only as steady as this):", ""]
  for when in ("load_start", "load_end"):
    load = meta.get(when)
    if load:
      out.append(f"* {when.replace('_', ' ')}: load average {' '.join(load['loadavg'] or [])}")
      out.extend(f"  * {p}" for p in load["busy_processes"])
  out += ["", "Synthetic uint8 images (no download): 1437 8x8 grey for digits_conv (views: 2 "
          "augmented copies at 16x16), 5000 32x32 RGB otherwise (views: L, ab, Lab; "
          "upsampled to 224 for alexnet_half); bank of one row per image. `s / step` is the "
          "median over the timed steps after warm-up (each `block_until_ready`); compile = "
          "lower + compile of the pmapped step. XLA temp/args = `memory_analysis()` of the "
          "compiled step. Peak RSS = `ru_maxrss` of the setting's own process, which includes "
          "the jax runtime, the data and compilation; (+N) = that peak minus the RSS just "
          "before the step was compiled (state and data in memory, freed host memory "
          "released as the training loop does), i.e. what compiling and running the step "
          "added. Device peak is n/a on CPU (no `memory_stats()`). "
          "`cores used` = the worker's CPU time / wall time over the timed steps: how many of "
          f"the {meta['cpus']} cores the step actually got while sharing the machine. GFLOP = "
          "XLA's `cost_analysis()` of the compiled step"
          + ("." if on_cpu else
             "; on GPU it counts far fewer FLOP than XLA:CPU does for the same step (16 "
             "against 287 GFLOP for the paper's cmc step), so it leaves work out there: GFLOP "
             "and GFLOP/s on this device are not comparable with the CPU tables."), ""]
  steps_rows = pick("steps", "anchor")
  if steps_rows:
    out += ["## Step time and memory", "", *_steps_table(steps_rows), "",
            "## MetAug cost relative to the plain contrastive step", "",
            "Same encoder, batch, views, bank and data; `cmc` is the plain 3-view (digits: "
            "2-view) InfoNCE step with memory banks. `metaug` is the paper-ordered step (our "
            "default; virtual step from the updated encoder), `fused` takes the virtual step "
            "from the current encoder (`metaug.virtual_step_from=current`: Phase A's gradient "
            "is the inner one), `double-backward` is `metaug` with "
            "`metaug.meta_gradient=reverse`.", "", *_ratio_table(steps_rows), ""]
  anchor = pick("anchor")
  if anchor:
    n = {s.method: s.steps for s, _ in anchor}
    overrides = sorted({f"{k}={v}" for s, _ in anchor for k, v in s.overrides})
    out += ["## PAPER ANCHOR", "",
            f"Three AlexNet-half encoders (L, ab, Lab) at 224x224, batch "
            f"{ANCHOR['batch']}, K={ANCHOR['negatives']} negatives, bank N="
            f"{ANCHOR['bank_rows']} rows (5000 synthetic 32x32x3 images upsampled to 224 by "
            f"the views), `metaug.algorithm=paper`, 1 device"
            + (f", with {', '.join(f'`{o}`' for o in overrides)}" if overrides else "")
            + f". Measured with 1 warm-up step and {max(n.values())} timed steps"
            + (" only (minutes per step on this CPU)" if on_cpu else "")
            + ". The authors' numbers are their PyTorch code on a 2-core CPU machine; ratios "
            "> 1 mean ours is faster (images/s) or uses more memory (RSS)."
            + ("" if on_cpu else
               f" Here ours ran on {meta['platform']['kind']}, so the 'ours / authors' "
               "columns compare hardware as much as code: the like-for-like comparison is "
               "`experiments/results/benchmark_cpu.md`. The step-time ratios (MetAug / OUCL) "
               "compare like with like on any device."), "",
            *_anchor_table(anchor), ""]
  scaling = pick("scaling")
  if scaling:
    sim = any(s.simulated for s, _ in scaling)
    caption = ("Simulated CPU devices (`--xla_force_host_platform_device_count=N`, "
               f"`num_devices=N`) share the same {meta['cpus']} cores, so this measures the "
               "overhead of splitting the batch and of the cross-device collectives, not a "
               "speed-up; efficiency = (images/s at N) / (images/s at 1) / N, so ideal "
               "sharing of fixed cores would give 1/N.") if sim else \
        "Real devices; efficiency = (images/s at N) / (images/s at 1) / N (1.0 = linear)."
    out += ["## Scaling: one global batch over N devices", "", caption, "",
            *_scaling_table(scaling), ""]
  by_method = pick("methods")
  if by_method:
    out += ["## Every method's step", "",
            "Each registered method with its config variant (`configs/digits.py:NAME`; on the "
            "32x32 AlexNet `configs/cifar10.py:small,NAME`): cmc, the MetAug steps and the "
            "baselines. The Siamese baselines (moco, byol, simsiam, barlow_twins) and simclr "
            "contrast two views through one shared encoder, cmc and MetAug one encoder per "
            "view (3 Lab views on the AlexNet), so the ratios to `cmc` compare whole methods "
            "as a user would run them, not equal networks.", "", *_methods_table(by_method), ""]
  parts = pick("parts")
  if parts:
    out += ["## Where a MetAug step's time goes", "",
            "Each part compiled and timed alone on 1 device (median; parts include their own "
            "view augmentation, so they overlap by the `views` time). phase_a = gradient of "
            "L_total w.r.t. the encoders with the MAGs frozen (V+2 bank calls); phase_b = the "
            "MAG meta-gradient through the virtual encoder step in the paper's order (inner "
            "forward/backward, virtual forward/backward, then the second-order term: a "
            "forward-mode pass of the linearised encoder by default); full_step = "
            "the real step (adds optimiser and bank updates).", "",
            *_parts_table(parts), ""]
  return "\n".join(out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Step-time / memory benchmark (see module doc).")
  p.add_argument("--only", default="steps,anchor,scaling,parts,methods",
                 help="comma list of sections: steps, anchor, scaling, parts, methods")
  p.add_argument("--encoders", default=",".join(ENCODERS), help="comma list of encoders")
  p.add_argument("--methods", default="",
                 help="only these steps in the steps/anchor sections, e.g. 'cmc,metaug_fused' "
                      f"(default: the plain steps and {', '.join(STEP_METHODS)})")
  p.add_argument("--batches", default="",
                 help="per-encoder batches, e.g. 'digits_conv=64/128;alexnet_small=32'")
  p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--anchor_steps", type=int, default=2, help="timed steps of the anchor")
  p.add_argument("--scaling_devices", default="1,2,4,8")
  p.add_argument("--scaling_encoder", default="digits_conv")
  p.add_argument("--scaling_batch", type=int, default=128)
  p.add_argument("--scaling_methods", default="cmc,metaug")
  p.add_argument("--override", action="append", default=[],
                 help="config override for every setting, e.g. metaug.first_order=True")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per setting")
  p.add_argument("--json_out", default="", help="write every result here (updated as it runs)")
  p.add_argument("--md_out", default="", help="write the markdown report here")
  p.add_argument("--resume", action="store_true",
                 help="reuse the successful results already in --json_out")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker_main(Setting.from_json(args.worker))
    return
  start = time.time()
  meta = {"command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
          "python": platform.python_version(), "platform": probe_platform(),
          "load_start": machine_load()}
  batches = {}
  for part in filter(None, args.batches.split(";")):
    name, values = part.split("=")
    batches[name.strip()] = tuple(int(v) for v in values.split("/"))
  from metaug_jax.config_base import parse_literal  # pylint: disable=g-import-not-at-top
  overrides = tuple((k.strip(), parse_literal(v.strip()))
                    for k, v in (o.split("=", 1) for o in args.override))
  accel = meta["platform"]["count"] if meta["platform"]["platform"] != "cpu" else 0
  todo = plan(set(args.only.split(",")), [e for e in args.encoders.split(",") if e], batches,
              args.steps, args.warmup, args.anchor_steps,
              [int(n) for n in args.scaling_devices.split(",")], args.scaling_encoder,
              args.scaling_batch, args.scaling_methods.split(","), accel, overrides)
  if args.methods:
    keep = set(args.methods.split(","))
    todo = [s for s in todo if s.kind not in ("steps", "anchor") or s.method in keep]
  results = {}
  if args.resume and args.json_out and os.path.exists(args.json_out):
    results = {k: v for k, v in json.load(open(args.json_out))["results"].items()
               if "error" not in v["result"]}
  for i, setting in enumerate(todo):
    if setting.key in results:
      print(f"[{i + 1}/{len(todo)}] {setting.key}: reused", flush=True)
      continue
    print(f"[{i + 1}/{len(todo)}] {setting.key} ...", end=" ", flush=True)
    result = run_in_subprocess(setting, args.timeout)
    results[setting.key] = {"setting": setting.to_json(), "result": result}
    summary = result.get("error") or (
        f"{result['step_s']:.3f} s/step, compile {result['lower_s'] + result['compile_s']:.1f}"
        f" s, peak RSS {result['peak_rss_mib']:.0f} MiB" if "step_s" in result
        else f"parts done in {result['wall_s']:.0f} s")
    print(summary, flush=True)
    if args.json_out:
      _write_json(args.json_out, meta, results)
  meta["load_end"] = machine_load()
  meta["wall_min"] = (time.time() - start) / 60
  if args.json_out:
    _write_json(args.json_out, meta, results)
  # Order the report as planned (resumed results keep their place).
  ordered = {s.key: results[s.key] for s in todo if s.key in results}
  report = render_markdown(ordered, meta)
  print("\n" + report)
  if args.md_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.md_out)), exist_ok=True)
    with open(args.md_out, "w") as f:
      f.write(report + "\n")


def _write_json(path: str, meta: dict, results: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  os.replace(tmp, path)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)  # the repository's metaug_jax, installed or not
  main()
