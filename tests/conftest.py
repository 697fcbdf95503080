"""Test set-up: 4 simulated CPU devices, set before anything imports jax
(docs/implementation.md §3.3)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA compile time (second-order graphs): skipping most optimisations
# halves the suite's CPU time (the flax examples' trick). Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The default config's XLA:CPU conv kernels, set as `python -m metaug_jax.main` sets them
# before JAX's backend starts (importing jax does not start it).
from metaug_jax import xla_runtime  # noqa: E402
xla_runtime.apply_xla_cpu_conv_library("eigen")

from absl import flags  # noqa: E402

# absl flags are defined at import by metaug_jax.main; let pytest use them unparsed.
flags.FLAGS.mark_as_parsed()
