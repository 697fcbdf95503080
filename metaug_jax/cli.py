"""What the command-line tools share: user errors reported as one clear message and a non-zero
exit status (not a traceback), interrupts as one line and 130 (Ctrl-C) / 143 (SIGTERM), and a
console kept for progress rather than library logs."""

import contextlib
import difflib
import os
import re
import sys
from typing import Optional

from absl import flags, logging

from metaug_jax import config_base

from metaug_jax.checkpoint import CheckpointMismatchError, DamagedCheckpointError
from metaug_jax.config_check import ConfigError
from metaug_jax.data.sources import DataError, DatasetUnavailableError
from metaug_jax.evaluation.linear_probe import ProbeNeedsLabelsError
from metaug_jax.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DataError, DatasetUnavailableError, CheckpointMismatchError,
               ProbeNeedsLabelsError, NonFiniteLossError, FileNotFoundError,
               DamagedCheckpointError)


@contextlib.contextmanager
def user_errors_as_messages():
  """Turns the errors above into 'error: ...' on stderr and exit status 2 (a ConfigError lists
  one problem per line, so each of its lines is an 'error: ' line), and an interrupt into its
  one line (train.Interrupted says what was saved) and 128 + the signal number."""
  try:
    yield
  except USER_ERRORS as e:
    message = str(e.args[0]) if e.args else str(e)
    exit_with_errors(message.splitlines() if isinstance(e, ConfigError) else [message])
  except KeyboardInterrupt as e:
    print(str(e) or "interrupted", file=sys.stderr, flush=True)
    sys.exit(getattr(e, "exit_status", 130))


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


def default_workdir(config_arg: str) -> str:
  """runs/<config file stem>[-<variant parts>]: configs/digits.py:tiny,cmc -> runs/digits-tiny-cmc.

  The same command gives the same folder, so rerunning it resumes the run.
  """
  path, _, variant = config_arg.partition(":")
  parts = [os.path.splitext(os.path.basename(path))[0]] + [p for p in variant.split(",") if p]
  return os.path.join("runs", "-".join(re.sub(r"[^\w.=+-]", "_", p) for p in parts))


def parse_flags(argv: list) -> list:
  """absl's flag parsing, each bad flag, override or config file one 'error:' line, exit 2."""
  try:
    argv = flags.FLAGS(argv)
    error = _config_load_error()
    lines = [error] if error else []
  except (AttributeError, KeyError):  # ml_collections: an override of a field that is not there
    lines = unknown_config_fields(argv)
    if not lines:
      raise
  except flags.Error as e:
    lines = unknown_config_fields(argv) or [_flag_error_line(str(e))]
  if not lines:
    return argv
  exit_with_errors(lines)


def exit_with_errors(lines: list) -> None:
  """Prints each problem as an 'error: ' line on stderr and exits with status 2."""
  for line in lines:
    print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_load_error(name: str = "config") -> Optional[str]:
  """The line for a --config file that did not load (ml_collections defers that error), or None."""
  value = flags.FLAGS[name].value if name in flags.FLAGS else None
  if value is None:
    return None
  try:
    value.keys()
  except OSError as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    return f"--{name}: cannot load the config file ({reason})."
  return None


def _flag_error_line(text: str) -> str:
  """absl's message in one line; of a config file's traceback, only the exception line."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0], lines[-1]]
  return " ".join(lines)


def unknown_config_fields(argv: list, prefix: str = "--config.") -> list:
  """One line per --config.NAME override that names no field, with the closest field names."""
  base = config_base.get_base_config()
  known, leaves = _field_names(base), _field_names(base, leaves_only=True)
  lines = []
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    name = arg[len(prefix):].split("=", 1)[0]
    if name in known:
      continue
    close = difflib.get_close_matches(name, sorted(leaves), n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(close)}?" if close else
            "every field is listed in metaug_jax/config_base.py.")
    lines.append(f"{prefix}{name}: the config has no field {name!r}; {hint}")
  return lines


def _field_names(config, prefix: str = "", leaves_only: bool = False) -> set:
  """Every dotted field name of a ConfigDict, its sections too unless `leaves_only`."""
  names = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      names |= _field_names(value, f"{prefix}{key}.", leaves_only)
      if leaves_only:
        continue
    names.add(prefix + key)
  return names
