"""What the command-line tools share: user errors reported as one clear message and a non-zero
exit status (not a traceback), and a console kept for progress rather than library logs."""

import contextlib
import sys

from absl import flags, logging

from metaug_jax.checkpoint import CheckpointMismatchError
from metaug_jax.config_check import ConfigError
from metaug_jax.data.sources import DataError, DatasetUnavailableError
from metaug_jax.evaluation.linear_probe import ProbeNeedsLabelsError
from metaug_jax.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DataError, DatasetUnavailableError, CheckpointMismatchError,
               ProbeNeedsLabelsError, NonFiniteLossError, FileNotFoundError)


@contextlib.contextmanager
def user_errors_as_messages():
  """Turns the errors above into 'error: ...' on stderr and exit status 2.

  A ConfigError lists one problem per line, so each of its lines is an 'error: ' line.
  """
  try:
    yield
  except USER_ERRORS as e:
    message = str(e.args[0]) if e.args else str(e)
    lines = message.splitlines() if isinstance(e, ConfigError) else [message]
    for line in lines:
      print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


def quiet_library_logs():
  """orbax logs every save at INFO; keep the console for progress unless --verbosity is set."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
