"""The authors'-code options of MetAug: metaug.margin_code_exact (util.margin_injection_loss_calc's
choice of threshold and penalised directions) and bank.schedule="code_exact"'s bank rows."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaug_jax import config_base, config_check, losses, memory_bank
from metaug_jax.methods import DataFacts
from metaug_jax.methods.metaug import MetAug

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits  # noqa: E402


def _method(num_views=3, **overrides):
  c = digits.get_config("tiny")
  c.method = "metaug"
  c.data.num_views = num_views
  c.model.width = 0.25
  c.model.embedding_dim = 8
  c.model.mag_hidden = 16
  c.batch_size = 4
  c.bank.num_negatives = 1
  c.update_from_flattened_dict(overrides)
  facts = DataFacts(view_channels=(1,) * num_views, bank_size=16, steps_per_epoch=1,
                    global_batch=4)
  return MetAug(c, facts)


# ---- which directions give thresholds, which are penalised -------------------------------------


def test_code_exact_columns_three_views():
  dirs = memory_bank.directions(3)   # (0,1) (0,2) (1,0) (1,2) (2,0) (2,1)
  # S_1 (view 0 augmented): thresholds from (1,2), (2,1); the four touching view 0 penalised.
  assert losses.code_exact_columns(dirs, 0) == ((3, 5), (0, 1, 2, 4))
  assert losses.code_exact_columns(dirs, 1) == ((1, 4), (0, 2, 3, 5))
  assert losses.code_exact_columns(dirs, 2) == ((0, 2), (1, 3, 4, 5))


def test_code_exact_columns_four_views_and_two():
  dirs = memory_bank.directions(4)
  for v in range(4):
    thresholds, penalised = losses.code_exact_columns(dirs, v)
    assert len(thresholds) == 6 and len(penalised) == 6
    assert all(v not in dirs[d] for d in thresholds) and all(v in dirs[d] for d in penalised)
  with pytest.raises(ValueError, match="needs >= 3 views: with 2, every direction"):
    losses.code_exact_columns(memory_bank.directions(2), 0)


def test_config_check_rejects_code_exact_margin_with_two_views():
  c = config_base.get_base_config()          # metaug, 2 augmented copies
  c.metaug.margin_code_exact = True
  with pytest.raises(config_check.ConfigError, match="margin_code_exact=True needs >= 3 views"):
    config_check.validate(c, 1)
  c.data.num_views = 3
  config_check.validate(c, 1)


# ---- R on hand-built scores -------------------------------------------------------------------

# One anchor, K = 1: each direction holds (positive, negative). Directions in column order:
# d0 = l2ab (0,1), d1 = l2ori (0,2), d2 = ab2l (1,0), d3 = ab2ori (1,2), d4 = ori2l (2,0),
# d5 = ori2ab (2,1) with views l = 0, ab = 1, ori = 2 as in the authors' code.
_THRESHOLD = {   # (call, direction): the columns avoiding the call's augmented view
    (1, 3): (0.80, 0.30), (1, 5): (0.70, 0.40),     # S1 (l augmented): ab2ori, ori2ab
    (2, 4): (0.90, 0.20), (2, 1): (0.60, 0.50),     # S2 (ab augmented): ori2l, l2ori
    (3, 2): (0.75, 0.35), (3, 0): (0.85, 0.10),     # S3 (ori augmented): ab2l, l2ab
}
_PENALISED = {   # the columns touching the call's augmented view
    (1, 0): (0.70, 0.20), (1, 1): (0.40, 0.90), (1, 2): (0.10, 0.55), (1, 4): (0.55, 0.65),
    (2, 0): (0.50, 0.30), (2, 2): (0.65, 0.60), (2, 3): (0.45, 0.70), (2, 5): (0.80, 0.10),
    (3, 1): (0.30, 0.80), (3, 3): (0.52, 0.58), (3, 4): (0.90, 0.95), (3, 5): (0.60, 0.40),
}


def _scores():
  rng = np.random.default_rng(0)
  calls = [rng.uniform(size=(1, 6, 2)) for _ in range(5)]   # S0 and S4 must not matter
  for (call, d), (p, n) in {**_THRESHOLD, **_PENALISED}.items():
    calls[call][0, d] = (p, n)
  return [jnp.asarray(s, jnp.float32) for s in calls]


# By hand, from the authors' rule:
#   threshold positives {0.80, 0.70, 0.90, 0.60, 0.75, 0.85}: p_min = 0.60;
#   threshold negatives {0.30, 0.40, 0.20, 0.50, 0.35, 0.10}: n_max = 0.50.
#   large: sigma+ = min(0.60, 0.50) = 0.50, sigma- = max(0.60, 0.50) = 0.60.
#   [p - 0.50]_+ over the 12 penalised positives:
#     S1: 0.20, 0, 0, 0.05   S2: 0, 0.15, 0, 0.30   S3: 0, 0.02, 0.40, 0.10   sum 1.22
#   [0.60 - n]_+ over the 12 penalised negatives:
#     S1: 0.40, 0, 0.05, 0   S2: 0.30, 0, 0, 0.50   S3: 0, 0.02, 0, 0.20      sum 1.47
#   R = 1e-4 * 1.22 / 12 + 1.47 / 12.
#   small swaps: sigma+ = 0.60, sigma- = 0.50:
#     positives: S1 0.10, 0, 0, 0   S2 0, 0.05, 0, 0.20   S3 0, 0, 0.30, 0      sum 0.65
#     negatives: S1 0.30, 0, 0, 0   S2 0.20, 0, 0, 0.40   S3 0, 0, 0, 0.10      sum 1.00
#   R = 1e-4 * 0.65 / 12 + 1.00 / 12.
@pytest.mark.parametrize("margin_type,expected", [
    ("large", 1e-4 * 1.22 / 12 + 1.47 / 12),
    ("small", 1e-4 * 0.65 / 12 + 1.00 / 12)])
def test_code_exact_margin_matches_hand_computation(margin_type, expected):
  method = _method(**{"metaug.margin_code_exact": True, "metaug.margin_type": margin_type})
  value = method.margin_term(_scores())
  np.testing.assert_allclose(float(value), expected, rtol=1e-6)


def test_code_exact_thresholds_carry_gradient():
  """The authors do not detach the thresholds: d R / d (threshold p_min's score) is nonzero."""
  method = _method(**{"metaug.margin_code_exact": True})
  scores = _scores()
  grad = jax.grad(lambda s2: method.margin_term(scores[:2] + [s2] + scores[3:]))(scores[2])
  # S2's l2ori positive (0.60) is p_min, which is sigma- under large: every active negative
  # hinge [sigma- - n]_+ (6 of them) adds 1/12 to its gradient.
  np.testing.assert_allclose(float(grad[0, 1, 0]), 6 / 12, rtol=1e-6)


# ---- bank.schedule="code_exact": the authors' raw uniform rows ---------------------------------


def test_init_banks_raw_uniform_rows():
  key = jax.random.PRNGKey(3)
  raw = memory_bank.init_banks(key, 3, 200, 16, unit_norm=False)
  s = 1.0 / np.sqrt(16 / 3)
  np.testing.assert_allclose(raw, jax.random.uniform(key, (3, 200, 16), jnp.float32, -s, s),
                             rtol=0, atol=1e-7)
  norms = np.linalg.norm(np.asarray(raw), axis=-1)
  assert abs(np.mean(norms ** 2) - 1.0) < 0.05 and np.std(norms) > 0.05   # E|row|^2 = 1
  np.testing.assert_allclose(memory_bank.init_banks(key, 3, 200, 16),
                             raw / norms[..., None], rtol=1e-6)


def test_code_exact_schedule_starts_from_raw_rows():
  views = tuple(jnp.zeros((4, 16, 16, 1)) for _ in range(2))
  clean = _method(2).init(jax.random.PRNGKey(0), views).banks
  exact = _method(2, **{"bank.schedule": "code_exact"}).init(jax.random.PRNGKey(0), views).banks
  np.testing.assert_allclose(np.linalg.norm(clean, axis=-1), 1.0, rtol=1e-6)
  norms = np.linalg.norm(exact, axis=-1)
  assert np.abs(norms - 1.0).max() > 0.05                       # not unit-normalised
  np.testing.assert_allclose(exact / norms[..., None], clean, rtol=1e-5, atol=1e-6)
