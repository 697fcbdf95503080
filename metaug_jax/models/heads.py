"""Prediction heads on top of an encoder's projection (BYOL's and SimSiam's predictors)."""

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from metaug_jax.models.encoders import parse_dtype
from metaug_jax.models.layers import batch_norm, dense, output_dtype

Dtype = Any


class PredictorMLP(nn.Module):
  """Dense(hidden) -> BN -> ReLU -> Dense(out_dim): BYOL's predictor q (Grill et al. 2020,
  Sec. 3.3: 4096 hidden) and SimSiam's bottleneck h (Chen & He 2021, Sec. 3: 512 hidden)."""
  hidden: int
  out_dim: int
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(x, 2)
    h = dense(self.hidden, x.shape[-1], dtype=self.dtype, name="fc1")(x.astype(self.dtype))
    h = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn1")(h))
    out = dense(self.out_dim, h.shape[-1], dtype=self.dtype, name="fc2")(h)
    return out.astype(output_dtype(out.dtype))


def build_predictor(model_config: Any, hidden: int, axis_name: Optional[str] = None):
  """A PredictorMLP from the config `model` section, mapping embedding_dim to itself."""
  return PredictorMLP(hidden=int(hidden), out_dim=int(model_config.embedding_dim),
                      axis_name=axis_name, dtype=parse_dtype(model_config.dtype))
