"""train_and_evaluate(config, workdir): the loop used by the CLI, the tests and the notebook.

Order of work: validate config -> load data -> build method -> init or resume state ->
pmapped steps with progress, JSON-lines metrics and periodic checkpoints -> final checkpoint
-> linear probe on the frozen encoder.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Optional

import flax.jax_utils
import jax
import ml_collections
from absl import logging

from metaug_jax import checkpoint as ckpt_lib
from metaug_jax import config_check, host_memory, methods, parallel, xla_runtime
from metaug_jax.data import loader as loader_lib
from metaug_jax.data import sources
from metaug_jax.data import views as views_lib
from metaug_jax.evaluation import linear_probe
from metaug_jax.evaluation import monitor as monitor_lib
from metaug_jax.evaluation import plots


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before any step runs."""
  config: ml_collections.ConfigDict
  dataset: sources.ImageDataset
  method: methods.Method
  devices: list
  loader: loader_lib.EpochLoader
  total_steps: int

  def _sample_views(self):
    """Two eval views of real images: they only fix the parameter shapes."""
    return views_lib.make_eval_views(self.dataset.pretrain_images[:2], self.config.data)

  def init_state(self, seed: Optional[int] = None):
    """A fresh state (jitted init)."""
    key = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    return jax.jit(self.method.init)(key, self._sample_views())

  def abstract_state(self):
    return jax.eval_shape(self.method.init, jax.random.PRNGKey(0), self._sample_views())


def build_experiment(config: ml_collections.ConfigDict,
                     dataset: Optional[sources.ImageDataset] = None,
                     apply_xla_settings: bool = True) -> Experiment:
  """Validates the config and builds data, method and loader (nothing is written).

  With `apply_xla_settings` it first applies the config's process-level XLA settings
  (`xla_runtime.apply_config`); restore-for-eval turns that off, because reading the
  checkpoint starts JAX's backend first and those settings only concern training.
  """
  if apply_xla_settings:
    xla_runtime.apply_config(config)
  devices = parallel.local_devices(config.num_devices) if jax.process_count() == 1 \
      else jax.local_devices()
  config_check.validate(config, len(devices), jax.process_count())
  if jax.process_count() > 1:
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  dataset = dataset or sources.load_dataset(config)
  config_check.validate_data(config, dataset, len(devices) * jax.process_count())
  loader = loader_lib.EpochLoader(dataset.pretrain_images, global_batch_size=config.batch_size,
                                  num_devices=len(devices), seed=config.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  total = config.num_train_steps or config.num_epochs * loader.steps_per_epoch
  warning = config_check.decay_warning(config, int(total), loader.steps_per_epoch)
  if warning and jax.process_index() == 0:
    print(warning, file=sys.stderr, flush=True)
  facts = methods.DataFacts(
      view_channels=tuple(views_lib.view_channels(config.data, dataset.pretrain_images.shape[-1])),
      bank_size=int(dataset.pretrain_images.shape[0]), steps_per_epoch=loader.steps_per_epoch,
      global_batch=config.batch_size)
  return Experiment(config, dataset, methods.build(config, facts), devices, loader, int(total))


class MetricWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl (big_vision style),
  and writes TensorBoard scalars too when tensorboardX is installed."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.tensorboard = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tensorboard is not None:
      for k, v in record.items():
        if k != "step":
          self.tensorboard.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


def train(config: ml_collections.ConfigDict, workdir: str,
          experiment: Optional[Experiment] = None):
  """Pre-trains (resuming from the newest checkpoint in workdir); returns (experiment, state)."""
  exp = experiment or build_experiment(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    ckpt_lib.check_compatible(ckpt.restore_config(latest), config, workdir)
    state = ckpt.restore_state(exp.abstract_state(), latest)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
    print(f"resuming from the checkpoint at step {latest}", flush=True)
  else:
    state = exp.init_state()
  start = int(state.step)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  step_fn = compile_step(exp, state)
  monitor = monitor_lib.Monitor.maybe_create(exp, workdir)  # None: disabled or no labels
  writer = MetricWriter(workdir, enabled=is_main)
  host_batches = loader_lib.prefetch(exp.loader.iterate(start), config.data.prefetch)
  batches = host_batches
  if jax.process_count() == 1:  # copy the next batches to the devices while a step runs
    batches = flax.jax_utils.prefetch_to_device(host_batches, 2, exp.devices)
  bar = _progress(exp.total_steps, start, config.progress_bar and is_main)
  step, last_saved, tick, tick_step = start, start, time.time(), start
  try:
    if monitor is not None and step == 0:
      writer.write(0, monitor.run(0, state))     # the initial state's kNN and histograms
      tick = time.time()
    while step < exp.total_steps:
      state, metrics = step_fn(state, next(batches))
      step += 1
      if step % config.log_every_steps == 0 or step == exp.total_steps:
        metrics = jax.device_get(metrics)
        if not all(math.isfinite(float(v)) for v in metrics.values()):
          bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
          raise NonFiniteLossError(
              f"non-finite metrics {bad} between steps {step - config.log_every_steps} and "
              f"{step}; the checkpoint at step {last_saved} is kept. Lower the learning rate "
              f"or run with JAX_DEBUG_NANS=True to find the first NaN.")
        now = time.time()
        metrics["steps_per_sec"] = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        writer.write(step, metrics)
        if bar is not None:
          shown = metrics.get("loss", metrics.get("loss_total", 0.0))
          bar.set_postfix(loss=f"{shown:.4f}", steps_s=f"{metrics['steps_per_sec']:.2f}")
      if monitor is not None and monitor.due(step, exp.total_steps):
        started = time.time()
        writer.write(step, monitor.run(step, state))
        tick += time.time() - started            # steps_per_sec stays a training speed
      if bar is not None:
        bar.update(1)
      if step % config.checkpoint_every_steps == 0:
        ckpt.save(step, state, config)
        last_saved = step
      if config.debug_kill_at_step and step == config.debug_kill_at_step:
        ckpt.wait()  # crash drill for the tests: die hard, right after a checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
  except NonFiniteLossError:
    state = None  # never checkpoint a diverged state: the last good one stays the newest
    raise
  except KeyboardInterrupt:
    print(f"\ninterrupted at step {step}; saving a checkpoint so the run can resume", flush=True)
    raise
  finally:
    if bar is not None:
      bar.close()
    host_batches.close()
    writer.close()
    if state is not None and step > last_saved and _alive(state):
      ckpt.save(step, state, config)
    ckpt.close()
  plots.write_diagnostics(exp, state, workdir)  # PNGs if config.eval.plots; never raises
  return exp, state


def compile_step(exp: Experiment, state):
  """The pmapped train step, compiled ahead of time for `state` and the loader's batches.

  Freed host memory is handed back to the OS before and after compiling, so that the
  garbage of the init and of the compiler does not add to the training loop's peak RSS.
  """
  step_fn = parallel.pmap_step(exp.method.train_step, exp.devices,
                               precision=exp.config.model.matmul_precision)
  host_memory.release()
  step_fn.compile(state, exp.loader.batch_at(0))
  host_memory.release()
  return step_fn


def _alive(state) -> bool:
  """False if the state's buffers were donated to a step that never returned."""
  try:
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))
  except Exception:  # pylint: disable=broad-except
    return False


def evaluate_state(exp: Experiment, state, workdir: Optional[str] = None,
                   title: str = "linear probe") -> dict:
  """Linear probe of a state's frozen encoder; prints a table and writes probe JSON."""
  params, stats = jax.device_get((state.params, state.batch_stats))
  results = linear_probe.evaluate(exp.method, params, stats, exp.dataset, exp.config)
  print(linear_probe.format_table(results, f"{title} ({exp.config.dataset}, "
                                           f"{exp.config.method}, step {int(state.step)})"),
        flush=True)
  if workdir and jax.process_index() == 0:
    with open(os.path.join(workdir, f"probe_step_{int(state.step)}.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-train, checkpoint, then linear-probe; returns the probe results (or {})."""
  exp = build_experiment(config)
  config_check.validate_probe_data(config, exp.dataset)  # before training, not after it
  exp, state = train(config, workdir, exp)
  if not config.eval.probe_after_training:
    return {}
  return evaluate_state(exp, state, workdir)
