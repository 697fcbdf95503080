"""Checkpoints with orbax: save every N steps and at the end, keep the last K, resume.

A checkpoint holds the train state and the config it was trained with (JSON), so that
`metaug_jax.eval` can rebuild the model from the workdir alone and a resumed run can refuse a
config whose shapes do not match.
"""

import json
import os
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

# Fields that change parameter or bank shapes: a checkpoint cannot be used with others.
SHAPE_FIELDS = ("method", "dataset", "data.views", "data.num_views", "data.input_size",
                "model.encoder", "model.embedding_dim", "model.width", "model.share_encoder",
                "model.mag_hidden")


class CheckpointMismatchError(ValueError):
  """The config passed does not fit the checkpoint found in the workdir."""


def _get(d, dotted):
  for part in dotted.split("."):
    d = d[part]
  return d


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises CheckpointMismatchError naming every shape-relevant field that differs."""
  diffs = []
  for name in SHAPE_FIELDS:
    try:
      old, new = _get(saved, name), _get(config, name)
    except (KeyError, AttributeError):
      continue
    if old != new:
      diffs.append(f"config.{name}: checkpoint has {old!r}, config has {new!r}")
  if diffs:
    raise CheckpointMismatchError(
        f"the checkpoint in {where} was trained with a different config:\n  " +
        "\n  ".join(diffs) + "\nUse the same values (or a fresh --workdir).")


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with the items 'state' and 'config'."""

  def __init__(self, workdir: str, keep: int = 3, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"no checkpoints in {workdir} (expected {self.directory}); train "
                              f"first with python -m metaug_jax.main --workdir={workdir}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "config"))

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

  def restore_state(self, abstract_state, step: Optional[int] = None):
    """Restores onto the shapes/shardings of `abstract_state` (jax.eval_shape of init)."""
    step = self._resolve(step)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return out["state"]

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
