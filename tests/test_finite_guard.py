"""The finiteness guard: flags from inside the pmapped step, the first bad step recorded on the
device, and the message the loop stops with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import finite_guard, parallel, train
from metaug_jax.methods import common

BAD_AT = 3
diverged, save_last = train._diverged, train._save_last  # pylint: disable=protected-access


def toy_state():
  return common.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)},
                           batch_stats={}, opt_state={"m": jnp.zeros(3)}, banks=None,
                           rng=jax.random.PRNGKey(0))


def toy_step(metrics_go_bad: bool):
  """Adds the batch mean to the weights; at step BAD_AT the weights become NaN (and the loss
  too, unless only the state should go bad)."""

  def step(state, batch):
    n = state.step + 1
    w = jnp.where(n == BAD_AT, jnp.nan, state.params["w"] + parallel.pmean(batch.mean()))
    loss = jnp.sum(w) if metrics_go_bad else jnp.float32(1.0)
    metrics = {"loss": loss, "grad_norm": jnp.float32(2.0), "count": n}
    return state.replace(step=n, params={"w": w}), metrics

  return step


@pytest.mark.parametrize("metrics_go_bad,what", [
    (True, ["the metric 'loss'", "the updated parameters"]),
    (False, ["the updated parameters"])])
def test_record_names_the_first_bad_step_on_four_devices(metrics_go_bad, what):
  devices = jax.local_devices()
  assert len(devices) == 4
  step_fn = parallel.pmap_step(finite_guard.wrap(toy_step(metrics_go_bad)), devices)
  state, record = toy_state(), None
  batch = np.ones((4, 2), np.float32)
  for i in range(6):
    state, (metrics, flags) = step_fn(state, batch)
    record = finite_guard.update(record, flags, state.step)
    if i + 1 < BAD_AT:
      assert finite_guard.first_bad(jax.device_get(record)) is None
  assert int(state.step) == 6                         # the guard only watches
  bad = finite_guard.first_bad(jax.device_get(record))
  assert bad == (BAD_AT, what)                        # the first bad step, not the last
  message = str(diverged(jax.device_get(record), 2))
  assert message.startswith(f"training diverged at step {BAD_AT}: {what[0]}")
  assert "resume from the checkpoint at step 2 with a lower --config.optim.lr" in message
  assert "\n" not in message


def test_guard_returns_the_step_unchanged_with_flags():
  state, batch = toy_state(), jnp.ones((2,))
  plain = toy_step(True)
  guarded = finite_guard.wrap(plain)
  step_fn = lambda f: jax.vmap(f, in_axes=(None, 0), out_axes=None, axis_name=parallel.AXIS)
  new, metrics = step_fn(plain)(state, batch[None])
  new_g, (metrics_g, flags) = step_fn(guarded)(state, batch[None])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), (new, metrics),
                                   (new_g, metrics_g)))
  assert set(flags["metrics"]) == {"loss", "grad_norm", "count"}
  assert set(flags["state"]) == set(finite_guard.STATE_PARTS)
  assert bool(finite_guard.all_true(flags))


def test_all_finite_checks_floating_leaves_only():
  key = jax.random.PRNGKey(0)
  assert bool(finite_guard.all_finite({"a": jnp.ones(2), "k": key, "i": jnp.int32(3)}))
  assert not bool(finite_guard.all_finite({"a": jnp.array([1.0, jnp.inf]), "k": key}))
  assert bool(finite_guard.all_finite(None)) and bool(finite_guard.all_finite({}))


def test_without_a_checkpoint_the_message_says_so():
  record = {"step": np.int32(1), "bad": {"metrics": {"update_norm": True, "loss": False},
                                         "state": {"params": False}}}
  message = str(diverged(record, None))
  assert message.startswith("training diverged at step 1: the metric 'update_norm' became")
  assert "the run has no finite checkpoint" in message


class SaveRecorder:
  """Stands for a Checkpointer: records the steps saved."""

  def __init__(self):
    self.saved = []

  def all_steps(self):
    return list(self.saved)

  def save(self, step, state, config):
    del state, config
    self.saved.append(step)


def test_the_loops_last_save_skips_a_non_finite_state():
  """The save in the loop's finally-block (Ctrl-C, SIGTERM, the end) checks the state itself,
  not only the record: a NaN state is never written."""
  ckpt = SaveRecorder()
  nan_state = toy_state().replace(step=jnp.int32(5), params={"w": jnp.array([jnp.nan, 0, 0])})
  assert save_last(ckpt, nan_state, None, None, 2) is None
  assert ckpt.saved == []
  state = toy_state().replace(step=jnp.int32(5))
  assert save_last(ckpt, state, None, None, 2) == 5
  assert save_last(ckpt, state, None, None, 5) is None       # not newer than the newest
  assert ckpt.saved == [5]
