"""Progress output: plain lines off a terminal, a bar on one, and a speed that counts queued
training steps as training (a fake clock; no sleeping)."""

import io

import pytest

from metaug_jax import progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class QueuedSteps:
  """Stands for a state whose steps were dispatched but still run: waiting takes `seconds`."""

  def __init__(self, clock, seconds):
    self.clock, self.seconds = clock, seconds

  def block_until_ready(self):
    self.clock.now += self.seconds
    return self


def test_a_pause_leaves_out_its_own_time_but_not_the_steps_it_waited_for():
  clock = FakeClock()
  timer = progress.StepTimer(0, clock=clock)
  # Ten steps dispatched at once (asynchronously): the clock has not moved. The monitor then
  # waits 4 s for them to finish, and takes 20 s itself.
  with timer.pause(QueuedSteps(clock, 4.0)):
    clock.now += 20.0
  assert timer.rate(10) == pytest.approx(10 / 4.0)
  clock.now += 5.0                                   # the next ten steps, no pause
  assert timer.rate(20) == pytest.approx(10 / 5.0)


def test_restart_counts_from_now():
  clock = FakeClock()
  timer = progress.StepTimer(0, clock=clock)
  clock.now = 30.0                                   # compiling, a first monitor pass
  timer.restart(0)
  clock.now += 2.0
  assert timer.rate(4) == pytest.approx(2.0)


def test_plain_lines_say_step_loss_speed_and_time_left():
  out = io.StringIO()
  p = progress.PlainProgress(200, stream=out)
  p.log(40, 5.12345, 3.2)
  assert out.getvalue() == "step 40/200  loss 5.1235  3.20 steps/s  ETA 0:00:50\n"
  assert progress.format_duration(3723) == "1:02:03"
  assert progress.format_duration(float("inf")) == "?"
  assert "ETA ?" in progress.plain_line(1, 10, 1.0, 0.0)


class Stderr(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


@pytest.mark.parametrize("tty,bar,kind", [(True, True, progress.BarProgress),
                                          (False, True, progress.PlainProgress),
                                          (True, False, progress.PlainProgress)])
def test_a_bar_only_on_a_terminal_and_when_asked(monkeypatch, tty, bar, kind):
  monkeypatch.setattr("sys.stderr", Stderr(tty))
  shown = progress.make(10, 0, bar=bar)
  assert type(shown) is kind  # pylint: disable=unidiomatic-typecheck
  shown.close()
  assert type(progress.make(10, 0, bar=bar, enabled=False)) is progress.NoProgress
