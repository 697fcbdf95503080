"""Command line: python -m metaug_jax.main --config=configs/digits.py [--workdir=DIR].

Kept short on purpose: the logic lives in train.py, importable from tests and notebooks.
Every config field can be overridden, e.g. --config.batch_size=256 --config.method=cmc.
Without --workdir the run goes to runs/<config name>[-<variant>] (runs/digits-tiny for
--config=configs/digits.py:tiny), so the same command resumes it.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from metaug_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots; "
                               "an existing run there is resumed. Default: "
                               "runs/<config file name>[-<variant parts>].")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0 (else from environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
  if len(argv) > 1:
    cli.exit_with_errors([f"unexpected arguments {argv[1:]}: every option is a flag, e.g. "
                          f"--config=FILE.py --config.FIELD=VALUE --workdir=DIR."])
  cli.quiet_library_logs()
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = cli.default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    print(f"workdir: {workdir} (default from the config; pass --workdir to choose)", flush=True)
  # pylint: disable-next=g-import-not-at-top
  from metaug_jax import parallel, train, xla_runtime  # after flag parsing: jax starts up here
  with cli.user_errors_as_messages():
    # XLA reads these from XLA_FLAGS when its backend starts: set them before anything can.
    xla_runtime.apply_config(_CONFIG.value)
    parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, argv=cli.resolve_config_argument(sys.argv), flags_parser=cli.parse_flags)
