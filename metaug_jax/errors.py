"""The errors a user can fix, and how the command-line tools report them: one clear message and
a non-zero exit status, not a traceback."""

import contextlib
import sys

from metaug_jax.checkpoint import CheckpointMismatchError
from metaug_jax.config_check import ConfigError
from metaug_jax.data.sources import DatasetUnavailableError
from metaug_jax.evaluation.linear_probe import ProbeNeedsLabelsError

USER_ERRORS = (ConfigError, DatasetUnavailableError, CheckpointMismatchError,
               ProbeNeedsLabelsError, FileNotFoundError)


@contextlib.contextmanager
def user_errors_as_messages():
  """Turns the errors above into 'error: ...' on stderr and exit status 2."""
  try:
    yield
  except USER_ERRORS as e:
    message = str(e.args[0]) if e.args else str(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
