"""train_and_evaluate(config, workdir): the loop used by the CLI, the tests and the notebook.

Order of work: validate config -> load data -> build method -> init or resume state (from
the newest intact checkpoint) -> pmapped, finite-guarded steps with progress, JSON-lines
metrics and periodic checkpoints -> final checkpoint -> probes of the frozen encoder.

Long runs stop safely: Ctrl-C and SIGTERM save the last finished step (Interrupted); a NaN
or inf anywhere in a step's metrics or updated state stops the run before it is checkpointed
(NonFiniteLossError).
"""

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Optional

import flax.jax_utils
import jax
import ml_collections
from absl import logging

from metaug_jax import checkpoint as ckpt_lib
from metaug_jax import config_check, finite_guard, host_memory, methods, parallel
from metaug_jax import progress as progress_lib
from metaug_jax import xla_runtime
from metaug_jax.data import loader as loader_lib
from metaug_jax.data import sources
from metaug_jax.data import views as views_lib
from metaug_jax.evaluation import colour_probe
from metaug_jax.evaluation import features as features_lib
from metaug_jax.evaluation import monitor as monitor_lib
from metaug_jax.evaluation import plots, probes


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf: the run stops, and no checkpoint of that state is written."""


class Terminated(KeyboardInterrupt):
  """SIGTERM (a preempted VM, Slurm, Colab) as an exception the loop handles like Ctrl-C."""
  exit_status = 128 + signal.SIGTERM


class Interrupted(KeyboardInterrupt):
  """The loop stopped on Ctrl-C or SIGTERM after saving its last finished step.

  The message says what was saved; `exit_status` is 128 + the signal number, as a shell
  reports a process killed by it (130 for Ctrl-C, 143 for SIGTERM).
  """

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


class _SigtermFlag:
  """A SIGTERM handler that asks the loop to stop: `check()` (between steps) raises Terminated
  once a signal came, so a state is never lost half-way through a step; a second SIGTERM
  raises at once, for a loop stuck elsewhere."""

  def __init__(self):
    self.received = 0

  def __call__(self, signum, frame):
    del signum, frame
    self.received += 1
    if self.received > 1:
      raise Terminated()

  def check(self) -> None:
    if self.received:
      raise Terminated()


@contextlib.contextmanager
def _sigterm_stops_the_loop():
  """Installs a _SigtermFlag for SIGTERM and restores the previous handler after (signal
  handlers exist in the main thread only; elsewhere the flag is never set)."""
  flag = _SigtermFlag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, flag)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


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
    """A fresh state (jitted init); with bank.init="encoder" the memory banks start as the
    initial encoder's embeddings of every pre-training image."""
    key = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    state = jax.jit(self.method.init)(key, self._sample_views())
    if self.method.uses_bank and self.config.bank.init == "encoder":
      extract = features_lib.method_extractor(self.method, self.config.data,
                                              self.config.eval.batch_size, self.devices,
                                              names=("embedding",))
      embeddings = extract(state.params, state.batch_stats, self.dataset.pretrain_images)
      # Embeddings are unit-norm per view already: view v's block is bank v.
      state = state.replace(banks=jax.numpy.asarray(
          features_lib.split_views(embeddings["embedding"], self.method.num_views)))
    return state

  def abstract_state(self):
    return jax.eval_shape(self.method.init, jax.random.PRNGKey(0), self._sample_views())


def build_experiment(config: ml_collections.ConfigDict,
                     dataset: Optional[sources.ImageDataset] = None,
                     apply_xla_settings: bool = True) -> Experiment:
  """Validates the config and builds data, method and loader (nothing is written).

  With `apply_xla_settings` it first applies the config's process-level XLA settings
  (`xla_runtime.apply_config`) and warns about a learning-rate schedule the run will not
  reach; restore-for-eval turns that off, because reading the checkpoint starts JAX's backend
  first and both only concern training.
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
                                  process_count=jax.process_count(),
                                  order=config.data.order)
  total = config.num_train_steps or config.num_epochs * loader.steps_per_epoch
  warning = config_check.decay_warning(config, int(total), loader.steps_per_epoch)
  if warning and apply_xla_settings and jax.process_index() == 0:
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


def _restore_or_init(exp: Experiment, ckpt: ckpt_lib.Checkpointer, workdir: str):
  """(state, step) of the newest intact checkpoint, or (a fresh state, None) without one.

  Damaged newer checkpoints are skipped with one warning line and moved aside (so the run
  writes those steps again); a workdir whose checkpoints are all damaged is an error, never
  a silent fresh start.
  """
  config = exp.config
  if not ckpt.all_steps():
    if ckpt.unfinished():
      print(ckpt_lib.skipped_warning([(s, f"a save that never finished: {name}")
                                      for s, name in ckpt.unfinished()],
                                     "starting from step 0"), file=sys.stderr, flush=True)
    return exp.init_state(), None

  def target(saved: dict):
    ckpt_lib.check_compatible(saved, config, workdir)
    return ckpt_lib.Target(exp.abstract_state(), config)

  found = ckpt.restore_intact(target, advice=f"a fresh --workdir, or deleting "
                                             f"{ckpt.directory}, starts over")
  if found.skipped:
    moved = ckpt.set_aside([s for s, _ in found.skipped])
    aside = f" (moved to {os.path.dirname(moved[0])})" if moved else ""
    print(ckpt_lib.skipped_warning(found.skipped, f"resuming from step {found.step}{aside}"),
          file=sys.stderr, flush=True)
  logging.info("resumed from step %d in %s", found.step, ckpt.directory)
  print(f"resuming from the checkpoint at step {found.step}", flush=True)
  return found.state, found.step


def _diverged(record, newest: Optional[int]) -> Optional[NonFiniteLossError]:
  """The error to stop with if a fetched finite_guard record saw a NaN/inf, else None."""
  bad = finite_guard.first_bad(record)
  if bad is None:
    return None
  then = (f"resume from the checkpoint at step {newest} with a lower --config.optim.lr"
          if newest is not None else
          "the run has no finite checkpoint: start again with a lower --config.optim.lr")
  return NonFiniteLossError(f"training diverged at step {bad[0]}: {finite_guard.describe(bad)}; "
                            f"nothing from that step on was checkpointed; {then} "
                            f"(JAX_DEBUG_NANS=True finds the operation)")


def _check_finite(record, newest: Optional[int]) -> None:
  """Raises NonFiniteLossError if the (device) record saw a NaN/inf; fetches it."""
  error = _diverged(jax.device_get(record), newest)
  if error is not None:
    raise error


def _save_last(ckpt, state, record, config, newest: Optional[int]) -> Optional[int]:
  """Checkpoints the state of the last finished step when it is newer than the newest
  checkpoint, was not donated to an unfinished step, and is finite; returns the step saved."""
  if state is None or not _alive(state):
    return None
  step = int(state.step)
  if step <= (newest or 0) or step in ckpt.all_steps():
    return None
  if _diverged(jax.device_get(record), newest) or not bool(_all_finite(state)):
    return None
  ckpt.save(step, state, config)
  return step


_all_finite = jax.jit(finite_guard.all_finite)


def _interrupted(error: KeyboardInterrupt, step: int, saved: Optional[int],
                       newest: Optional[int]) -> Interrupted:
  """Interrupted with the one line the CLI prints: what stopped the run and how to go on."""
  by, status = ("SIGTERM", Terminated.exit_status) if isinstance(error, Terminated) \
      else ("Ctrl-C", 128 + signal.SIGINT)
  if saved is not None:
    then = f"saved a checkpoint at step {saved}: rerun the same command to resume"
  elif newest is not None:
    then = f"the newest checkpoint is at step {newest}: rerun the same command to resume"
  else:
    then = "no checkpoint was saved: rerun the same command to start over"
  return Interrupted(f"interrupted by {by} at step {step}; {then}", int(status))


def train(config: ml_collections.ConfigDict, workdir: str,
          experiment: Optional[Experiment] = None):
  """Pre-trains (resuming from the newest intact checkpoint in workdir); returns
  (experiment, state).

  Ctrl-C and SIGTERM stop the loop with a checkpoint of the last finished step (Interrupted);
  a NaN/inf in the loss, a metric or the updated state stops it with NonFiniteLossError and
  no checkpoint of that state (finite_guard).
  """
  exp = experiment or build_experiment(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  state, newest = _restore_or_init(exp, ckpt, workdir)
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
  progress = progress_lib.make(exp.total_steps, start, config.progress_bar, enabled=is_main)
  timer = progress_lib.StepTimer(start)
  step, record, interrupt, saved = start, None, None, None
  with _sigterm_stops_the_loop() as sigterm:
    try:
      if monitor is not None and step == 0:
        writer.write(0, monitor.run(0, state))     # the initial state's kNN and histograms
        timer.restart(0)
      while step < exp.total_steps:
        state, (metrics, flags) = step_fn(state, next(batches))
        record = finite_guard.update(record, flags, state.step)
        step += 1
        progress.update(1)
        if step % config.log_every_steps == 0 or step == exp.total_steps:
          metrics, seen = jax.device_get((metrics, record))
          error = _diverged(seen, newest)
          if error is not None:
            raise error
          metrics = dict(metrics, steps_per_sec=timer.rate(step))
          writer.write(step, metrics)
          progress.log(step, float(metrics.get("loss", metrics.get("loss_total", 0.0))),
                       metrics["steps_per_sec"])
        if monitor is not None and monitor.due(step, exp.total_steps):
          _check_finite(record, newest)
          with timer.pause(state):                  # steps_per_sec stays a training speed
            writer.write(step, monitor.run(step, state))
        if step % config.checkpoint_every_steps == 0:
          _check_finite(record, newest)             # only finite states are checkpointed
          ckpt.save(step, state, config)
          newest = step
        if config.debug_kill_at_step and step == config.debug_kill_at_step:
          ckpt.wait()  # crash drill for the tests: die hard, right after a checkpoint
          os.kill(os.getpid(), signal.SIGKILL)
        sigterm.check()
    except NonFiniteLossError:
      state = None  # never checkpoint a diverged state: the last good one stays the newest
      raise
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through sigterm.check()
      interrupt = e
    finally:
      progress.close()
      host_batches.close()
      writer.close()
      saved = _save_last(ckpt, state, record, config, newest)
      ckpt.close()
  if interrupt is None and sigterm.received:  # SIGTERM during the last step or the save
    interrupt = Terminated()
  if interrupt is not None:
    raise _interrupted(interrupt, step, saved, newest) from None
  plots.write_diagnostics(exp, state, workdir)  # PNGs if config.eval.plots; never raises
  return exp, state


def compile_step(exp: Experiment, state):
  """The pmapped, finite-guarded train step, compiled ahead of time for `state` and the
  loader's batches: state, (metrics, finite_guard flags) = step(state, batch).

  Freed host memory is handed back to the OS before and after compiling, so that the
  garbage of the init and of the compiler does not add to the training loop's peak RSS.
  """
  step_fn = parallel.pmap_step(finite_guard.wrap(exp.method.train_step), exp.devices,
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
                   title: str = "linear probes and kNN") -> dict:
  """Every probe of a state's frozen encoder (evaluation/probes.py: linear with all and few
  labels, validation-selected, kNN); prints a table and writes probe_step_N.json."""
  params, stats = jax.device_get((state.params, state.batch_stats))
  results = probes.evaluate(exp.method, params, stats, exp.dataset, exp.config, exp.devices)
  print(probes.format_results(results, f"{title} ({exp.config.dataset}, "
                                       f"{exp.config.method}, step {int(state.step)})"),
        flush=True)
  if workdir and jax.process_index() == 0:
    with open(os.path.join(workdir, f"probe_step_{int(state.step)}.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-train, checkpoint, then probe (evaluate_state); returns the probe results (or {})."""
  exp = build_experiment(config)
  config_check.validate_probe_data(config, exp.dataset)  # before training, not after it
  exp, state = train(config, workdir, exp)
  if not config.eval.probe_after_training:
    return {}
  results = evaluate_state(exp, state, workdir)
  colour_probe.run_if_enabled(exp, state, workdir)  # eval.colour_probe: prints, writes its JSON
  return results
