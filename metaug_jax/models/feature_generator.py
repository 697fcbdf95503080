"""The learned operator of feature augmentation: a residual MLP generator
(docs/feature_augmentation.md §3.2, op "learned").

MetAug's generator (models/mag.py) without its meta step: an MLP that maps a feature to an
augmented one, trained by its own optimiser on the feature-augmentation term (adversarially or
jointly). Unlike the MAG it is residual, x' = x + r([x, noise]), with the last layer of r
initialised at zero, so training starts from the identity, the feature "similar to the
original" that the similarity constraint asks for; and it has no BatchNorm, so a copy does not
depend on the other rows of its batch. The noise input makes several copies of one feature
differ.
"""

from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from metaug_jax.models.layers import dense


class FeatureGenerator(nn.Module):
  """x' = x + Dense(F)(ReLU(Dense(hidden)(ReLU(Dense(hidden)([x, noise]))))), last layer zero.

  Args (call): x (B, F) features; noise (B, noise_dim) or None when noise_dim is 0.
  Returns (B, F) float32.
  """
  hidden: int = 256
  noise_dim: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, noise: Optional[jax.Array]) -> jax.Array:
    chex.assert_rank(x, 2)
    x = x.astype(jnp.float32)
    h = x
    if self.noise_dim:
      chex.assert_shape(noise, (x.shape[0], self.noise_dim))
      h = jnp.concatenate([x, noise.astype(jnp.float32)], axis=-1)
    for i in (1, 2):
      h = nn.relu(dense(self.hidden, h.shape[-1], name=f"fc{i}")(h))
    residual = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros,
                        bias_init=nn.initializers.zeros, name="fc3")(h)
    return x + residual
