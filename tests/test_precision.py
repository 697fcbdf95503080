"""config.model.matmul_precision reaches the lowered training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import config_base, config_check, parallel


def _toy_step(state, batch):
  loss = jnp.mean((batch["x"] @ state["w"]) ** 2)
  return {"w": state["w"] - 0.1 * parallel.pmean(jax.grad(
      lambda w: jnp.mean((batch["x"] @ w) ** 2))(state["w"]))}, {"loss": parallel.pmean(loss)}


@pytest.mark.parametrize("precision,marker", [("highest", "HIGHEST"), ("high", "HIGH"),
                                              ("default", None)])
def test_pmap_step_lowers_matmuls_at_the_configured_precision(precision, marker):
  devices = jax.local_devices()[:2]
  step = parallel.pmap_step(_toy_step, devices, donate=False, precision=precision)
  state = {"w": jnp.ones((3, 3))}
  batch = {"x": np.ones((2, 4, 3), np.float32)}
  text = step.lower(state, batch).as_text()
  assert "dot_general" in text
  if marker is None:
    assert "HIGH" not in text
  else:
    assert f"precision = [{marker}, {marker}]" in text
  new_state, metrics = step(state, batch)          # and it runs
  assert np.isfinite(float(metrics["loss"])) and new_state["w"].shape == (3, 3)


def test_matmul_precision_is_validated():
  config = config_base.get_base_config()
  assert config.model.matmul_precision == "highest"  # until measured on accelerators
  config.model.matmul_precision = "tf32"
  with pytest.raises(config_check.ConfigError, match="model.matmul_precision='tf32'"):
    config_check.validate(config, 1)
