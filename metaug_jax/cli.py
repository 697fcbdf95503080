"""What the command-line tools share: user errors reported as one clear message and a non-zero
exit status (not a traceback), interrupts as one line and 130 (Ctrl-C) / 143 (SIGTERM), and a
console kept for progress rather than library logs."""

import contextlib
import sys

from absl import flags, logging

from metaug_jax.checkpoint import CheckpointMismatchError, DamagedCheckpointError
from metaug_jax.config_check import ConfigError
from metaug_jax.data.sources import DatasetUnavailableError
from metaug_jax.evaluation.linear_probe import ProbeNeedsLabelsError
from metaug_jax.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DatasetUnavailableError, CheckpointMismatchError,
               ProbeNeedsLabelsError, NonFiniteLossError, FileNotFoundError,
               DamagedCheckpointError)


@contextlib.contextmanager
def user_errors_as_messages():
  """Turns the errors above into 'error: ...' on stderr and exit status 2, and an interrupt
  into its one line (train.Interrupted says what was saved) and 128 + the signal number."""
  try:
    yield
  except USER_ERRORS as e:
    message = str(e.args[0]) if e.args else str(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
  except KeyboardInterrupt as e:
    print(str(e) or "interrupted", file=sys.stderr, flush=True)
    sys.exit(getattr(e, "exit_status", 130))


def quiet_library_logs():
  """orbax logs every save at INFO; keep the console for progress unless --verbosity is set."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
