"""Damage a workdir's checkpoints the ways real runs do (shared by the train and eval tests).

What orbax 0.12.8 writes for a step (`find checkpoints/6` after a tiny run):
  6/_CHECKPOINT_METADATA                       step metadata (restore does not need it)
  6/commit_success.txt
  6/config/metadata                            the JsonSave'd config
  6/state/_METADATA, _sharding, manifest.ocdbt, array_metadatas/process_0
  6/state/d/<hash>, 6/state/ocdbt.process_0/d/<hash>  the array data (largest files)
A save in progress lives in "6.orbax-checkpoint-tmp" and is renamed to "6" when complete.
"""

import os
import shutil

METADATA_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata")
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"


def step_dir(workdir, step: int) -> str:
  return os.path.join(str(workdir), "checkpoints", str(step))


def files_under(folder: str) -> list:
  return [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]


def truncate_largest_file(workdir, step: int) -> str:
  """Cuts the step's largest data file to half its size (a copy or a write cut short)."""
  path = max(files_under(step_dir(workdir, step)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def delete_metadata(workdir, step: int, names=METADATA_FILES) -> list:
  """Deletes the step's metadata files called `names` (default: all of them)."""
  gone = [p for p in files_under(step_dir(workdir, step)) if os.path.basename(p) in names]
  for path in gone:
    os.remove(path)
  return gone


def fake_unfinished_save(workdir, step: int, like: int) -> str:
  """A half-written "<step>.orbax-checkpoint-tmp" (a copy of step `like` without its array
  data), as a save killed before orbax renamed it leaves behind."""
  path = step_dir(workdir, step) + UNFINISHED_SUFFIX
  shutil.copytree(step_dir(workdir, like), path)
  shutil.rmtree(os.path.join(path, "state", "ocdbt.process_0"))
  os.remove(os.path.join(path, "commit_success.txt"))
  return path


def delete_step(workdir, step: int) -> None:
  shutil.rmtree(step_dir(workdir, step))


def copy_workdir(source, dest) -> str:
  shutil.copytree(str(source), str(dest))
  return str(dest)
