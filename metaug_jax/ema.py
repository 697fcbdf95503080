"""Target networks as exponential moving averages of the online network, as pure functions.

BYOL's target follows the online network with a decay that rises from `base` to 1 on a cosine
schedule (Grill et al., NeurIPS 2020, Sec. 3.2); MoCo's key encoder uses the same update with
a constant momentum m (He et al., CVPR 2020, Eq. 2). Both apply to every leaf of the tree
they are given, so params and BatchNorm statistics are averaged alike.
"""

from typing import Union

import chex
import jax
import jax.numpy as jnp

Scalar = Union[float, jax.Array]

# MoCo's momentum m: 0.999 on ImageNet (He et al. 2020), 0.99 the usual choice at CIFAR scale.
MOCO_MOMENTUM_IMAGENET = 0.999
MOCO_MOMENTUM_CIFAR = 0.99


def byol_decay(step: Union[int, jax.Array], total_steps: int, base: float = 0.996) -> jax.Array:
  """BYOL's decay tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2 (Grill et al. 2020, Sec. 3.2).

  Equals `base` at k = 0 and 1 at k = K (the target freezes at the end of training).

  Args:
    step: the current step k (traced or not).
    total_steps: the number of training steps K.
    base: tau_base.
  Returns:
    A float32 scalar.
  """
  k = jnp.asarray(step, jnp.float32)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * k / total_steps) + 1.0) / 2.0


def ema_update(target, online, decay: Scalar):
  """target <- decay * target + (1 - decay) * online, leaf by leaf (Grill et al. 2020, Eq. 1).

  The online tree is a constant here (no gradient flows into the target's update). Every leaf
  must be floating point; the result keeps the target's dtypes.

  Args:
    target: pytree of the target network's variables (params, batch_stats, ...).
    online: a pytree of the same structure and shapes.
    decay: tau in [0, 1].
  Returns:
    The new target pytree.
  """
  chex.assert_trees_all_equal_shapes(target, online)

  def mix(t, o):
    if not jnp.issubdtype(t.dtype, jnp.floating):
      raise TypeError(f"ema_update needs floating leaves, got {t.dtype}")
    o = jax.lax.stop_gradient(o)
    return (decay * t + (1.0 - decay) * o).astype(t.dtype)

  return jax.tree_util.tree_map(mix, target, online)


def momentum_update(key_tree, query_tree, momentum: Scalar = MOCO_MOMENTUM_CIFAR):
  """MoCo's key encoder update theta_k <- m theta_k + (1 - m) theta_q (He et al. 2020, Eq. 2).

  `ema_update` with a constant decay m.
  """
  return ema_update(key_tree, query_tree, momentum)
