"""OUCL, the optimisation-driven unified contrastive loss (paper forms 1-3).

See docs/metaug.md §4.1 and decision A3.

Scores are the paper's d in [0, 1] (d = (cos + 1) / 2, docs/metaug.md §3.4). For one anchor with
positive scores p_k and negative scores n_j, the pair double sums of forms 2 and 3 factorise
  log(1 + sum_k sum_j exp(a_j + b_k)) = softplus(LSE_j(a_j) + LSE_k(b_k)),
which is exact, stable for large beta, and never builds the P x N pair matrix
(docs/metaug.md §4.1: this is what the released code computes).
"""

import chex
import jax
import jax.numpy as jnp

_FORMS = (1, 2, 3)
_SCALES = ("code", "paper")


def _lse(x: jax.Array) -> jax.Array:
  """log-sum-exp over the last axis."""
  return jax.nn.logsumexp(x, axis=-1)


def oucl(pos: jax.Array, neg: jax.Array, *, form: int = 3, beta: float = 16.0,
         gamma_pos: float = 0.0, gamma_neg: float = 0.0, margin: float = 0.25,
         adaptive: bool = False, scale: str = "code") -> jax.Array:
  """Per-anchor OUCL (docs/metaug.md §4.1).

  Forms (P positives k, N negatives j per anchor; c the prefactor):
    1 (hinge):  [sum_j n_j - sum_k p_k + margin]_+                      (no prefactor)
    2 (circle): c * log(1 + sum_k sum_j exp(beta[(p_k - 1)^2 + n_j^2 - 2 margin^2]))
    3 (general): c * log(1 + sum_k sum_j exp(beta[G-_j (n_j - g-) - G+_k (p_k - g+)]))
  with c = 16 / beta for scale="code" (the released code; 1 at beta = 16) or 1 / beta for
  scale="paper". In form 3, G = 1 and g+- = gamma_pos / gamma_neg unless `adaptive`; then
  (Circle Loss, Sun et al. 2020, with m = margin) G+ = stop_gradient([1 + m - p]_+),
  G- = stop_gradient([n + m]_+), g+ = 1 - m, g- = m, and gamma_pos / gamma_neg are ignored.
  This is what the code's `--alpha_enable_gh` meant to compute at m = 0.25 ([1.25 - d+]_+,
  [d- + 0.25]_+) before overwriting the weights with 1.

  Args:
    pos: (B, P) positive scores in [0, 1].
    neg: (B, N) negative scores in [0, 1].
    form: 1, 2 or 3.
    beta: the scale beta (forms 2 and 3).
    gamma_pos: g+ of form 3 (non-adaptive).
    gamma_neg: g- of form 3 (non-adaptive).
    margin: lambda (form 1), gamma (form 2), m (adaptive form 3).
    adaptive: form 3 only: the stop-gradient circle weights above.
    scale: "code" or "paper" prefactor of forms 2 and 3.
  Returns:
    (B,) per-anchor losses.
  """
  chex.assert_rank([pos, neg], 2)
  chex.assert_equal(pos.shape[0], neg.shape[0])
  if form not in _FORMS:
    raise ValueError(f"OUCL form must be one of {_FORMS}, got {form!r}")
  if scale not in _SCALES:
    raise ValueError(f"OUCL scale must be one of {_SCALES}, got {scale!r}")
  pos = pos.astype(jnp.promote_types(pos.dtype, jnp.float32))
  neg = neg.astype(jnp.promote_types(neg.dtype, jnp.float32))

  if form == 1:
    return jax.nn.relu(jnp.sum(neg, axis=-1) - jnp.sum(pos, axis=-1) + margin)

  if form == 2:
    # beta[(p-1)^2 + n^2 - 2 gamma^2] = beta(n^2 - gamma^2) + beta((p-1)^2 - gamma^2).
    a = beta * (neg * neg - margin ** 2)
    b = beta * ((pos - 1.0) ** 2 - margin ** 2)
  else:
    if adaptive:
      w_pos = jax.lax.stop_gradient(jax.nn.relu(1.0 + margin - pos))
      w_neg = jax.lax.stop_gradient(jax.nn.relu(neg + margin))
      g_pos, g_neg = 1.0 - margin, margin
    else:
      w_pos, w_neg, g_pos, g_neg = 1.0, 1.0, gamma_pos, gamma_neg
    a = beta * w_neg * (neg - g_neg)
    b = -beta * w_pos * (pos - g_pos)
  prefactor = (16.0 if scale == "code" else 1.0) / beta
  return prefactor * jax.nn.softplus(_lse(a) + _lse(b))
