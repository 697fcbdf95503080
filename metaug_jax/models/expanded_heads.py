"""Per-exit heads of expanded views (Zhang & Ma, CVPR 2022, Fig. 3c;
docs/hierarchical_augmentation.md): an augmentation embedder e_s (Linear(4 -> E) -> BN ->
ReLU) whose output is concatenated to the exit's feature, u = [h_s(x) || e_s(a)], then the
exit's own projector (the exits' predictors are `heads.PredictorMLP`s).
"""

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from metaug_jax.models.layers import batch_norm, dense, output_dtype

Dtype = Any
AUG_PARAMS = 4   # [brightness, contrast, saturation, hue]


class AugEmbedder(nn.Module):
  """Linear(4 -> dim) -> BN -> ReLU: the embedding of a view's colour-jitter parameters
  (fed raw; the BN standardises them)."""
  dim: int
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, a: jax.Array, train: bool) -> jax.Array:
    chex.assert_axis_dimension(a, -1, AUG_PARAMS)
    h = dense(self.dim, AUG_PARAMS, dtype=self.dtype, name="fc")(a.astype(self.dtype))
    return nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn")(h))


class Projector(nn.Module):
  """SimSiam's projector: [Linear -> BN -> ReLU] x (num_layers - 1) at `hidden`, then Linear
  (no bias) -> BN without affine parameters, to `out_dim` (Chen & He 2021, Sec. 4.1).
  Returns (z, the first hidden activation)."""
  hidden: int
  out_dim: int
  num_layers: int = 3
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(u, 2)
    if self.num_layers < 2:
      raise ValueError(f"the projector needs >= 2 layers, got {self.num_layers}")
    h = u.astype(self.dtype)
    first = None
    for i in range(self.num_layers - 1):
      h = dense(self.hidden, h.shape[-1], dtype=self.dtype, name=f"fc{i + 1}")(h)
      h = nn.relu(batch_norm(train, self.axis_name, self.dtype, name=f"bn{i + 1}")(h))
      first = h if first is None else first
    h = dense(self.out_dim, h.shape[-1], use_bias=False, dtype=self.dtype,
              name=f"fc{self.num_layers}")(h)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     axis_name=self.axis_name if train else None, use_scale=False,
                     use_bias=False, dtype=self.dtype, name=f"bn{self.num_layers}")(h)
    out = output_dtype(h.dtype)
    return h.astype(out), first.astype(out)


class ExpandedProjector(nn.Module):
  """One exit's head: with embed_dim > 0, u = [h || AugEmbedder(a)] (the expanded view),
  else u = h; then the exit's Projector. Returns (z, the projector's first hidden activation,
  the probe's "fc" level)."""
  embed_dim: int
  hidden: int
  out_dim: int
  num_layers: int = 3
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, a: jax.Array, train: bool) -> tuple:
    chex.assert_rank(h, 2)
    chex.assert_shape(a, (h.shape[0], AUG_PARAMS))
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    if self.embed_dim > 0:
      e = AugEmbedder(self.embed_dim, name="embed", **kw)(a, train)
      h = jnp.concatenate([h.astype(e.dtype), e], axis=-1)
    return Projector(self.hidden, self.out_dim, self.num_layers, name="projector",
                     **kw)(h, train)
