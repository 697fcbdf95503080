"""What the command-line tools share: user errors reported as one clear message and a non-zero
exit status (not a traceback), and a console kept for progress rather than library logs."""

import contextlib
import os
import sys

from absl import flags, logging

from metaug_jax.checkpoint import CheckpointMismatchError
from metaug_jax.config_check import ConfigError
from metaug_jax.data.sources import DatasetUnavailableError
from metaug_jax.evaluation.linear_probe import ProbeNeedsLabelsError
from metaug_jax.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DatasetUnavailableError, CheckpointMismatchError,
               ProbeNeedsLabelsError, NonFiniteLossError, FileNotFoundError)


@contextlib.contextmanager
def user_errors_as_messages():
  """Turns the errors above into 'error: ...' on stderr and exit status 2."""
  try:
    yield
  except USER_ERRORS as e:
    message = str(e.args[0]) if e.args else str(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def quiet_library_logs():
  """orbax logs every save at INFO; keep the console for progress unless --verbosity is set."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def packaged_config(path: str):
  """The installed copy of `configs/NAME.py` (package metaug_jax.configs), or None."""
  # pylint: disable-next=g-import-not-at-top
  from metaug_jax import configs
  candidate = os.path.join(os.path.dirname(configs.__file__), os.path.basename(path))
  return candidate if path.endswith(".py") and os.path.isfile(candidate) else None


def resolve_config_argument(argv: list, flag: str = "config") -> list:
  """argv with `--config=configs/NAME.py[:variant]` pointing at the installed copy of the file
  when the path does not exist (a wheel or `pip install git+...` outside the checkout)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{flag}="):
      value, rebuild = arg.split("=", 1)[1], lambda v: f"--{flag}={v}"
    elif arg == f"--{flag}" and i + 1 < len(out):
      value, rebuild, i = out[i + 1], lambda v: v, i + 1
    else:
      continue
    path, sep, variant = value.partition(":")
    if os.path.exists(path) or not packaged_config(path):
      continue
    found = packaged_config(path)
    print(f"{path} is not in the current directory: using the copy installed with "
          f"metaug-jax ({found})", file=sys.stderr, flush=True)
    out[i] = rebuild(found + sep + variant)
  return out
