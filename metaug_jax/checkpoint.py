"""Checkpoints with orbax: save every N steps and at the end, keep the last K, resume.

A checkpoint holds the train state and the config it was trained with (JSON), so that
`metaug_jax.eval` can rebuild the model from the workdir alone and a resumed run can refuse a
config whose shapes do not match: a few fields that identify the experiment must agree
(`SHAPE_FIELDS`), and the saved state's tree and array shapes (orbax's metadata) must be those
of the abstract state the current config builds (`state_differences`), whatever field made
them differ.

Checkpoints are read defensively: `Checkpointer.restore_intact` walks the steps newest first
and passes over damaged ones (a truncated data file, a missing metadata file, a save that never
finished), so a run killed mid-write or a half-copied workdir costs some steps, not the run.
"""

import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Any, Callable, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

# Fields that identify the experiment a checkpoint belongs to (the method, the data, the
# encoder): a checkpoint is refused with others even where its shapes would fit. Any other
# field that changes a shape is caught by comparing the state trees (`state_differences`).
SHAPE_FIELDS = ("method", "dataset", "data.views", "data.num_views", "data.input_size",
                "model.encoder", "model.embedding_dim", "model.width", "model.share_encoder",
                "model.mag_hidden")
DEFAULT_FIX = "use the checkpoint's values (or a fresh --workdir)"
# A mismatch's one line names this many differing arrays and config fields; the rest counted.
MAX_LEAVES, MAX_FIELDS = 3, 6
# The order in which a mismatch names the state's differing arrays: parameters first.
_PARTS = ("params", "banks", "batch_stats", "opt_state")


# orbax writes a step into "<step>.orbax-checkpoint-tmp[-<timestamp>]" and renames it when done.
_UNFINISHED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
DAMAGED_DIR = "damaged_checkpoints"  # workdir/damaged_checkpoints/<step>: set aside on resume
_REASON_CHARS = 160


class CheckpointMismatchError(ValueError):
  """The config passed does not fit the checkpoint found in the workdir."""


class DamagedCheckpointError(ValueError):
  """The checkpoint asked for, or every checkpoint in the workdir, cannot be read."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore_intact` found: the step, its saved config and state (None when
  no target was given), and the newer checkpoints it passed over as ((step, why), ...)."""
  step: int
  config: dict
  state: Any
  skipped: tuple


def short_reason(error: BaseException, strip: str = "") -> str:
  """The innermost cause's first line, without `strip`, cut short: orbax's and tensorstore's
  messages run to pages (a TensorStore spec), the cause says what is wrong."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.replace(strip, "") if strip else text
  return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


def skipped_warning(skipped, then: str) -> str:
  """One line: 'warning: skipping the checkpoint at step 6 (why); <then>'."""
  if len(skipped) == 1:
    step, why = skipped[0]
    return f"warning: skipping the checkpoint at step {step} ({why}); {then}"
  steps = ", ".join(f"{step} ({why})" for step, why in skipped)
  return f"warning: skipping the checkpoints at steps {steps}; {then}"


@dataclasses.dataclass(frozen=True)
class Target:
  """What `Checkpointer.restore_intact` restores a checkpoint onto: the abstract state the
  current config builds (jax.eval_shape of the method's init), that config (a mismatch names
  its fields that differ from the saved ones) and what a mismatch's message advises."""
  state: Any
  config: Optional[ml_collections.ConfigDict] = None
  fix: str = DEFAULT_FIX


def _get(d, dotted):
  for part in dotted.split("."):
    d = d[part]
  return d


def flat_config(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': [1]}} -> {'a.b': (1,)}: a JSON config by dotted field, lists back to tuples
  (configs use tuples), as ConfigDict.update_from_flattened_dict takes it."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def _named(items: list, most: int) -> str:
  """The first `most` items joined by '; ', and how many more there are."""
  more = len(items) - most
  return "; ".join(items[:most]) + (f"; and {more} more" if more > 0 else "")


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str,
                     fix: str = DEFAULT_FIX) -> None:
  """Raises CheckpointMismatchError, one line, naming every field of SHAPE_FIELDS that differs."""
  diffs = []
  for name in SHAPE_FIELDS:
    try:
      old, new = _get(saved, name), _get(config, name)
    except (KeyError, AttributeError):
      continue
    if old != new:
      diffs.append(f"config.{name}: checkpoint has {old!r}, config has {new!r}")
  if diffs:
    raise CheckpointMismatchError(f"the checkpoint in {where} was trained with a different "
                                  f"config ({'; '.join(diffs)}); {fix}")


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list:
  """'config.F: checkpoint has A, config has B' for every field whose value differs between
  the saved config (JSON) and `config`; the eval section's fields last."""
  old, new = flat_config(saved), flat_config(json.loads(config.to_json_best_effort()))
  missing = object()
  out = []
  for name in sorted(set(old) | set(new), key=lambda n: (n.startswith("eval."), n)):
    a, b = old.get(name, missing), new.get(name, missing)
    if a != b:
      a = "nothing" if a is missing else repr(a)
      b = "nothing" if b is missing else repr(b)
      out.append(f"config.{name}: checkpoint has {a}, config has {b}")
  return out


def _key_name(key) -> str:
  """A tree path entry's name: a dict key, an attribute or a sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree) -> dict:
  """{dotted path: shape} of a state's leaves, from arrays, ShapeDtypeStructs or orbax's
  ArrayMetadata alike (a dataclass field and a dict key of the same name give one path)."""
  return {".".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_differences(saved_tree, abstract_state) -> list:
  """One phrase per leaf that differs between a saved state (orbax metadata) and the abstract
  state of a config: present in one only, or of another shape."""
  saved, current = leaf_shapes(saved_tree), leaf_shapes(abstract_state)
  part = lambda name: name.split(".")[0]
  order = lambda name: (_PARTS.index(part(name)) if part(name) in _PARTS else len(_PARTS), name)
  out = []
  for name in sorted(set(saved) | set(current), key=order):
    if name not in current:
      out.append(f"{name}: only in the checkpoint")
    elif name not in saved:
      out.append(f"{name}: not in the checkpoint")
    elif saved[name] != current[name]:
      out.append(f"{name}: checkpoint {saved[name]}, config {current[name]}")
  return out


def mismatch_message(where: str, step: int, leaves: list, saved_config: dict,
                     target: Target) -> str:
  """The one line of a state that does not fit: its differing leaves (a few), the config
  fields that differ from the saved ones (a few), and the fix."""
  fields = ([] if target.config is None else
            config_differences(saved_config, target.config))
  cause = (f"config fields that differ from the checkpoint's: {_named(fields, MAX_FIELDS)}"
           if fields else
           "no config field differs from the checkpoint's, so the data (its number of "
           "examples: the memory-bank rows) or the code changed since it was written")
  arrays = f"{len(leaves)} array" + ("s" if len(leaves) > 1 else "")
  return (f"the checkpoint at step {step} in {where} does not fit this config: its state "
          f"differs in {arrays} ({_named(leaves, MAX_LEAVES)}); {cause}; {target.fix}")


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with the items 'state' and 'config'."""

  def __init__(self, workdir: str, keep: int = 3, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"no checkpoints in {workdir} (expected {self.directory}); train "
                              f"first with python -m metaug_jax.main --workdir={workdir}")
    # Saves run in the background (orbax's default, kept explicit): save() returns once the
    # arrays are copied off the devices, so the next step may donate them; close() waits.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True)
    # Handlers named up front, so that a step's metadata reads before anything is restored.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list:
    return list(self.manager.all_steps())

  def save(self, step: int, state, config: ml_collections.ConfigDict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self._resolve(step)
    out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out["config"]

  def state_metadata(self, step: Optional[int] = None):
    """The saved state's tree of orbax ArrayMetadata (shapes and dtypes, no data read).
    Without its _METADATA file orbax would guess a partial tree from the array store, which
    would read as a config mismatch: that is damage, and raises FileNotFoundError."""
    step = self._resolve(step)
    path = os.path.join(self.directory, str(step), "state", "_METADATA")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing")
    return self.manager.item_metadata(step)["state"]

  def restore_state(self, abstract_state, step: Optional[int] = None):
    """Restores onto the shapes/shardings of `abstract_state` (jax.eval_shape of init)."""
    step = self._resolve(step)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return out["state"]

  def restore_intact(self, target_fn: Callable[[dict], Any], step: Optional[int] = None,
                     advice: str = "") -> Restored:
    """The newest checkpoint that reads back (or exactly `step`), skipping damaged ones.

    Newest first, for each step: restores the saved config, asks `target_fn(config)` what to
    restore onto (a `Target`, a bare abstract state, or None when the config alone is
    wanted), compares the saved state's tree and shapes with it, then restores the state. A
    failure to read (orbax, tensorstore, IO or JSON errors) marks the step damaged and the
    walk goes on; a state that does not fit the target is a CheckpointMismatchError (one
    line: the differing arrays and config fields), as are errors raised by `target_fn`
    itself (a config mismatch); both propagate.
    Saves that never finished (orbax's temporary directories) newer than the step found are
    reported as skipped too. Raises DamagedCheckpointError, ending with `advice`, when
    `step`, or every checkpoint, is damaged; FileNotFoundError when there is none.
    """
    steps = [self._resolve(step)] if step else sorted(self._resolve_all(), reverse=True)
    skipped = [] if step else [(s, f"a save that never finished: {name}")
                               for s, name in self.unfinished() if s > steps[0]]
    for s in steps:
      try:
        config = self.restore_config(s)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises Exception)
        skipped.append((s, f"missing or unreadable config: {self._reason(e)}"))
        continue
      target = target_fn(config)
      if target is None:
        return Restored(s, config, None, tuple(skipped))
      if not isinstance(target, Target):
        target = Target(target)
      try:
        saved_tree = self.state_metadata(s)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((s, f"truncated or unreadable state: {self._reason(e)}"))
        continue
      leaves = state_differences(saved_tree, target.state)
      if leaves:
        # orbax would restore the saved shapes without a word (or fail deep inside).
        raise CheckpointMismatchError(mismatch_message(os.path.dirname(self.directory), s,
                                                       leaves, config, target))
      try:
        state = self.restore_state(target.state, s)
      except Exception as e:  # pylint: disable=broad-except
        _quiet_orphaned_reads()
        skipped.append((s, f"truncated or unreadable state: {self._reason(e)}"))
        continue
      return Restored(s, config, state, tuple(skipped))
    if step:
      problem = f"the checkpoint at step {step} in {self.directory} is damaged ({skipped[-1][1]})"
    else:
      reasons = "; ".join(f"step {s}: {why}" for s, why in skipped)
      problem = f"every checkpoint in {self.directory} is damaged ({reasons})"
    raise DamagedCheckpointError(f"{problem}; {advice}" if advice else problem)

  def unfinished(self) -> list:
    """[(step, directory name)] of saves that never finished, newest first."""
    if not os.path.isdir(self.directory):
      return []
    found = [(int(m.group(1)), name) for name in os.listdir(self.directory)
             if (m := _UNFINISHED.match(name))]
    return sorted(found, reverse=True)

  def set_aside(self, steps) -> list:
    """Moves the directories of damaged `steps` to workdir/damaged_checkpoints/, out of orbax's
    sight, so that a resumed run can write those steps again; returns where they went."""
    root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    sources = [os.path.join(self.directory, str(step)) for step in steps]
    moves = [(src, _free_path(os.path.join(root, os.path.basename(src))))
             for src in sources if os.path.isdir(src)]
    if jax.process_index() == 0:
      for source, dest in moves:
        os.makedirs(root, exist_ok=True)
        shutil.move(source, dest)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("metaug_set_aside")
    self.manager.reload()
    return [dest for _, dest in moves]

  def _reason(self, error: BaseException) -> str:
    return short_reason(error, strip=self.directory + os.sep)

  def _resolve_all(self) -> list:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return steps

  def _resolve(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step is None or step == 0:
      return max(steps)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {sorted(steps)}")
    return step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _quiet_orphaned_reads() -> None:
  """Silences the leftovers of a failed state restore, from then on.

  Orbax runs a restore in a fresh asyncio loop and closes it as soon as one array read fails.
  The step's other reads are abandoned: their coroutines raise the same read error when
  garbage-collected, and tensorstore's callbacks report into the closed loop ("Event loop is
  closed"); each prints a page through sys.unraisablehook, after the one-line warning or
  error, at some later collection or at exit. They say nothing new, so this hook drops
  exactly those and hands every other unraisable error to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "quiets_orphaned_reads", False):
    return

  def hook(unraisable):
    if not _is_orphaned_read(unraisable):
      previous(unraisable)

  hook.quiets_orphaned_reads = True
  sys.unraisablehook = hook


def _is_orphaned_read(unraisable) -> bool:
  """An abandoned orbax coroutine, or a callback into an asyncio loop already closed."""
  error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
  closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
  return closed_loop or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)


def _free_path(path: str) -> str:
  """`path`, or `path.1`, `path.2`, ... : the first that does not exist yet."""
  candidate, n = path, 0
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate
