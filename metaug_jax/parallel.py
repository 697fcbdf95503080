"""Data parallelism: the pmap wrapper, cross-device helpers and multi-host start-up.

The train state is replicated (pmap `in_axes=None, out_axes=None`, the flax imagenet idiom),
the batch carries a leading device axis. Inside a step, gradients are averaged with
`lax.pmean` *after* `grad` (docs/implementation.md §3.2: the pmap idiom), BatchNorm
statistics are synced over AXIS, and anything random is drawn for the global batch and sliced,
so a step gives the same result on any number of devices.
"""

import contextlib
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

AXIS = "batch"


def local_devices(num_devices: int = 0) -> list:
  """The first `num_devices` local devices (all of them when 0)."""
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} local devices exist "
                       f"({devices[0].platform}); use --config.num_devices=0 for all.")
    devices = devices[:num_devices]
  return devices


def matmul_precision(name: Optional[str]):
  """A context in which jax traces and lowers matmuls/convs at `name` ("high", "highest");
  None or "default" leaves jax's default (TF32 on GPUs, bfloat16 passes on TPUs)."""
  if name in (None, "default"):
    return contextlib.nullcontext()
  return jax.default_matmul_precision(name)


def pmap_step(step_fn: Callable, devices: Sequence, donate: bool = True,
              precision: Optional[str] = None) -> Callable:
  """Maps step_fn(state, batch) -> (state, metrics) over devices; state in/out replicated.

  The state is placed replicated over the local devices before each call, which is a no-op
  for every state the step itself returned. So the first call sees the same input sharding as
  the later ones and the step is traced once; and jax 0.10.2's multi-process pmap, which would
  otherwise copy a donated un-replicated argument and delete the original while the copy still
  shares its buffers ("Array has been deleted"), takes its no-copy path.

  In one process the step is compiled ahead of time, on its first call or by
  `step.compile(state, batch)` (which returns the executable); that one executable runs every
  call, so nothing recompiles and a batch of another shape is an error. Across processes,
  where a pmap lowers for the global batch but is called with this process's part, it
  compiles on its first call instead and `step.compile` returns None.
  `step.lower(state, batch)` gives the lowering. `precision` (config.model.matmul_precision)
  is the precision its float32 matmuls and convolutions are lowered with.
  """
  several = jax.process_count() > 1  # then pmap spans every process's devices
  mapped = jax.pmap(step_fn, axis_name=AXIS, in_axes=(None, 0), out_axes=(None, None),
                    donate_argnums=(0,) if donate else (), devices=None if several else devices)
  local = jax.local_devices() if several else list(devices)
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(local), (AXIS,)),
                                          jax.sharding.PartitionSpec())
  executable = []

  def lower(state, batch):
    with matmul_precision(precision):
      return mapped.lower(jax.device_put(state, replicated), batch)

  def compile_once(state, batch):
    if not several and not executable:
      executable.append(lower(state, batch).compile())
    return executable[0] if executable else None

  def step(state, batch):
    run = compile_once(state, batch) or mapped
    with matmul_precision(precision):  # where pmap compiles on this first call
      return run(jax.device_put(state, replicated), batch)

  step.lower = lower
  step.compile = compile_once
  return step


def device_offset(local_batch: int) -> jax.Array:
  """Global row of this device's first example (inside a pmapped function)."""
  return jax.lax.axis_index(AXIS) * local_batch


def local_rows(global_array: jax.Array, local_batch: int) -> jax.Array:
  """This device's rows of an array computed identically for the whole global batch."""
  return jax.lax.dynamic_slice_in_dim(global_array, device_offset(local_batch), local_batch, 0)


def gather_rows(x: jax.Array) -> jax.Array:
  """Concatenates every device's rows in device order: (B_local, ...) -> (B_global, ...)."""
  return jax.lax.all_gather(x, AXIS, tiled=True)


def example_keys(key: jax.Array, local_batch: int) -> jax.Array:
  """One key per example, a function of its global position only."""
  positions = device_offset(local_batch) + jnp.arange(local_batch)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def pmean(tree):
  return jax.lax.pmean(tree, AXIS)


def maybe_initialize_distributed(coordinator: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> None:
  """Starts JAX's multi-process runtime when asked by flags or environment.

  Arguments fall back to METAUG_COORDINATOR / METAUG_NUM_PROCESSES / METAUG_PROCESS_ID; with
  none given and none in the environment, this is a single-process run and nothing happens.
  On Cloud TPU / Slurm, set METAUG_DISTRIBUTED=auto to let JAX detect everything. It does
  not start JAX's backend, so process-level XLA settings (xla_runtime) can still follow.
  """
  coordinator = coordinator or os.environ.get("METAUG_COORDINATOR")
  if num_processes is None and os.environ.get("METAUG_NUM_PROCESSES"):
    num_processes = int(os.environ["METAUG_NUM_PROCESSES"])
  if process_id is None and os.environ.get("METAUG_PROCESS_ID"):
    process_id = int(os.environ["METAUG_PROCESS_ID"])
  if (coordinator or os.environ.get("METAUG_DISTRIBUTED") == "auto") \
      and not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Cross-process collectives on CPU hosts (the default of jax 0.10.2, not of every
    # version); it must be set before the backend starts. GPU/TPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("METAUG_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  elif coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
