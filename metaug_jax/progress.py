"""Training progress for people: a tqdm bar on a terminal, one plain line per logging step
elsewhere (a log file, CI, progress_bar=False), and a speed that leaves out other work.

A bar in a log file is one endless line of carriage returns, and with no bar nothing showed
at all; the plain lines say the same (step, loss, speed, time left) and read well anywhere.
"""

import contextlib
import sys
import time
from typing import Callable, Optional

import jax


def format_duration(seconds: float) -> str:
  """'1:02:03' (hours:minutes:seconds); '?' when unknown."""
  if not seconds >= 0 or seconds == float("inf"):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def plain_line(step: int, total: int, loss: float, steps_per_sec: float) -> str:
  """'step 40/200  loss 5.1234  3.10 steps/s  ETA 0:00:52'."""
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
  return (f"step {step}/{total}  loss {loss:.4f}  {steps_per_sec:.2f} steps/s  "
          f"ETA {format_duration(eta)}")


class PlainProgress:
  """One line per logging step on `stream` (stdout), flushed at once."""

  def __init__(self, total: int, stream=None):
    self.total = total
    self.stream = stream

  def update(self, n: int = 1) -> None:
    del n

  def log(self, step: int, loss: float, steps_per_sec: float) -> None:
    print(plain_line(step, self.total, loss, steps_per_sec), file=self.stream or sys.stdout,
          flush=True)

  def close(self) -> None:
    pass


class BarProgress:
  """tqdm's bar, with the loss and the speed as its postfix."""

  def __init__(self, total: int, initial: int):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    mininterval=1.0)

  def update(self, n: int = 1) -> None:
    self.bar.update(n)

  def log(self, step: int, loss: float, steps_per_sec: float) -> None:
    del step
    self.bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{steps_per_sec:.2f}")

  def close(self) -> None:
    self.bar.close()


class NoProgress(PlainProgress):
  """Prints nothing (processes other than 0)."""

  def log(self, step: int, loss: float, steps_per_sec: float) -> None:
    pass


def make(total: int, initial: int, bar: bool, enabled: bool = True):
  """A bar if `bar` and stderr (where tqdm draws) is a terminal, else plain lines; nothing
  unless `enabled`."""
  if not enabled:
    return NoProgress(total)
  if bar and sys.stderr.isatty():
    try:
      return BarProgress(total, initial)
    except ImportError:
      pass
  return PlainProgress(total)


class StepTimer:
  """Training steps per second between logging steps, leaving out paused work."""

  def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self.step, self.since, self.paused = step, clock(), 0.0

  @contextlib.contextmanager
  def pause(self, pending: Optional[object] = None):
    """Leaves the body's time out of the speed. Waits for `pending` (the state) first: steps
    dispatched asynchronously and still running are training time, and the body, reading the
    state, would otherwise wait for them on the paused clock (5x too fast a speed after a
    monitor pass)."""
    jax.block_until_ready(pending)
    started = self.clock()
    try:
      yield
    finally:
      self.paused += self.clock() - started

  def restart(self, step: int) -> None:
    """Counts from `step`, now, leaving out what came before (compiling, a first monitor)."""
    self.step, self.since, self.paused = step, self.clock(), 0.0

  def rate(self, step: int) -> float:
    """Steps per second from the last rate (or start) to `step`; then counts from there."""
    now = self.clock()
    rate = (step - self.step) / max(now - self.since - self.paused, 1e-9)
    self.step, self.since, self.paused = step, now, 0.0
    return rate
