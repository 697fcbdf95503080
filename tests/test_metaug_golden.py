"""MetAug's numbers are kept: the state after 3 steps of every step variant (paper order with
reverse and forward-over-reverse meta-gradients, fused, first order, legacy, only OUCL, the
authors' margin and bank schedule) matches fingerprints recorded before MetAug moved onto the
feature-augmentation interface (tests/golden/make_metaug_golden.py, which made
tests/golden/metaug_golden.json)."""

import json
import os
import sys

import jax
import jaxlib
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))
import make_metaug_golden as golden  # noqa: E402

with open(golden.GOLDEN) as _f:
  GOLDEN = json.load(_f)

# The largest change allowed: of any leaf, in units of its part's norm
# (make_metaug_golden.relative_errors), and of any metric, relative. Twice what float32
# summation order alone does to these runs: the same code on 1 device instead of 4
# (`make_metaug_golden.py --devices=...`, jax 0.10.2, CPU) moved a leaf by at most 1.5e-4 (the
# generators' momentum in the legacy and paper-order variants; 1e-5 fused and first order,
# 5e-7 only OUCL) and a metric by at most 1.1e-3 (the legacy step's second-order norm; 1.8e-4
# elsewhere), the per-device *_std statistics aside, which the device count changes by
# definition. Moving MetAug onto the feature-augmentation interface changed nothing: 0 for
# every variant.
LEAF_TOLERANCE = 3e-4
METRIC_TOLERANCE = 2e-3

# The default configuration's variant runs by default; the others compile second-order steps
# of their own (one to several minutes each on a busy 2-core machine) and are marked slow.
DEFAULT_VARIANTS = ("paper_forward_over_reverse",)
VARIANTS = [v if v in DEFAULT_VARIANTS else pytest.param(v, marks=pytest.mark.slow)
            for v in golden.VARIANTS]


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_state_after_three_steps_as_before_the_refactor(variant):
  if (GOLDEN["jax"], GOLDEN["jaxlib"]) != (jax.__version__, jaxlib.__version__):
    pytest.skip(f"fingerprints made with jax {GOLDEN['jax']} / jaxlib {GOLDEN['jaxlib']}; "
                f"XLA's float32 kernels of {jax.__version__} may round differently")
  want = GOLDEN["variants"][variant]
  state, metrics = golden.run(variant)
  got = golden.fingerprints(state)
  assert sorted(got) == sorted(want["state"])            # the same leaves, same shapes
  for path, w in want["state"].items():
    assert (got[path]["shape"], got[path]["dtype"]) == (w["shape"], w["dtype"]), path
    if not np.issubdtype(np.dtype(w["dtype"]), np.floating):   # step, keys: exact
      assert got[path] == w, path
  errors = golden.relative_errors(got, want["state"])
  worst = max(errors, key=errors.get)
  assert errors[worst] <= LEAF_TOLERANCE, (worst, errors[worst])
  assert [sorted(m) for m in metrics] == [sorted(m) for m in want["metrics"]]
  for step, (m, w) in enumerate(zip(metrics, want["metrics"])):
    for name, value in w.items():
      np.testing.assert_allclose(m[name], value, rtol=METRIC_TOLERANCE, atol=1e-7,
                                 err_msg=f"step {step + 1}: {name}")
