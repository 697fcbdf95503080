"""Give freed host memory back to the OS before the long-running training loop.

Building the state and compiling the step leave hundreds of MiB in the process that nothing
uses any more: Python reference cycles holding arrays from the Flax init, and heap pages that
glibc's malloc keeps after the compiler frees them. The step's own buffers then come on top,
so the process's peak RSS includes that garbage unless it is released first. At the paper's
setting, releasing after the init and after the compile lowered the peak RSS of the fused
MetAug step with model.remat from 3045 to 2706 MiB (two `experiments/benchmark.py
--only=anchor` runs on the 2-core CPU, before and after).
"""

import ctypes
import ctypes.util
import gc
import sys


def _libc_malloc_trim():
  """glibc's malloc_trim, or None (macOS, musl, Windows: nothing to trim this way)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):
    return None


_MALLOC_TRIM = _libc_malloc_trim()


def release() -> bool:
  """Collects Python garbage and returns malloc's free pages to the OS; True if trimmed."""
  gc.collect()
  if _MALLOC_TRIM is None:
    return False
  return bool(_MALLOC_TRIM(0))
