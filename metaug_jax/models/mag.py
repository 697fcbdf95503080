"""MAG, the meta feature augmentation generator (docs/metaug.md §3.2), one per view."""

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from metaug_jax.models.encoders import parse_dtype
from metaug_jax.models.layers import batch_norm, dense, l2_normalize, output_dtype

Dtype = Any


class MAG(nn.Module):
  """docs/metaug.md §3.2: fc1 Dense(hidden) BN ReLU, fc2 Dense(hidden) BN ReLU, fc3 Dense, L2.

  Input: the view's L2-normalised embedding z (B, D). Returns dict(hidden=(B, hidden) the fc2
  activation after BN + ReLU (the probe's MAG feature, decision A9 (b)), embedding=(B, out_dim)
  the unit-norm augmented embedding), both float32.
  """
  hidden: int = 2048
  out_dim: int = 128
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> dict:
    chex.assert_rank(z, 2)
    h = z.astype(self.dtype)
    for i in (1, 2):
      h = dense(self.hidden, h.shape[-1], dtype=self.dtype, name=f"fc{i}")(h)
      h = batch_norm(train, self.axis_name, self.dtype, name=f"bn{i}")(h)
      h = nn.relu(h)
    a = dense(self.out_dim, h.shape[-1], dtype=self.dtype, name="fc3")(h)
    out = {"hidden": h.astype(output_dtype(h.dtype)),
           "embedding": l2_normalize(a.astype(output_dtype(a.dtype)))}
    chex.assert_shape(out["hidden"], (z.shape[0], self.hidden))
    chex.assert_shape(out["embedding"], (z.shape[0], self.out_dim))
    return out


class MultiViewMAG(nn.Module):
  """One independent MAG per view (docs/metaug.md §3.2), submodules view_0, view_1, ..."""
  num_views: int
  hidden: int = 2048
  out_dim: int = 128
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embeddings: Sequence[jax.Array], train: bool) -> tuple[dict, ...]:
    if len(embeddings) != self.num_views:
      raise ValueError(f"expected {self.num_views} view embeddings, got {len(embeddings)}")
    return tuple(
        MAG(self.hidden, self.out_dim, self.axis_name, self.dtype, name=f"view_{i}")(z, train)
        for i, z in enumerate(embeddings))


def build_multiview_mag(model_config: Any, num_views: int,
                        axis_name: Optional[str] = None) -> MultiViewMAG:
  """MultiViewMAG from the config `model` section (mag_hidden, embedding_dim, dtype)."""
  return MultiViewMAG(num_views=num_views, hidden=int(model_config.mag_hidden),
                      out_dim=int(model_config.embedding_dim), axis_name=axis_name,
                      dtype=parse_dtype(model_config.dtype))
