"""Fingerprints of MetAug's state after 3 training steps, one per step variant, for the
refactoring test tests/test_metaug_golden.py.

COMMAND: python tests/golden/make_metaug_golden.py [--out tests/golden/metaug_golden.json]
         python tests/golden/make_metaug_golden.py --devices=/tmp/devices.json   # 1 vs 4

Run it from the repository root with the code whose numbers are to be kept. It runs every
variant of `VARIANTS` for 3 steps on a tiny digits-sized MetAug (2 or 3 views, 4 simulated
CPU devices, fixed batches and keys, the test suite's XLA settings) and writes, per variant,
the fingerprints of every leaf of the resulting state (params, batch_stats, opt_state, banks)
and the metrics of each step, with the jax/jaxlib versions. `--devices` instead prints how far
the same runs on 1 device land from the 4-device ones (float32 summation order alone, the
scale that the test's tolerance is set against) and keeps both runs' fingerprints.
"""

import argparse
import json
import os
import sys
import zlib

# The test suite's set-up (tests/conftest.py), before jax is imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]

from metaug_jax import xla_runtime  # noqa: E402

xla_runtime.apply_xla_cpu_conv_library("eigen")

import jax  # noqa: E402
import jaxlib  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import digits  # noqa: E402  (configs/digits.py)
from metaug_jax import parallel  # noqa: E402
from metaug_jax.methods import DataFacts, build  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metaug_golden.json")
STEPS = 3
GLOBAL_BATCH = 8
BANK_SIZE = 32
IMAGE_SIDE = 8

# name -> (config.method, number of views, config overrides). The MAG terms' weights and the
# virtual step are large enough that the MAGs and the second-order part move the state.
VARIANTS = {
    "paper_reverse": ("metaug", 2, {"metaug.meta_gradient": "reverse"}),
    "paper_forward_over_reverse": ("metaug", 2,
                                   {"metaug.meta_gradient": "forward_over_reverse"}),
    "fused_reverse": ("metaug", 2, {"metaug.virtual_step_from": "current",
                                    "metaug.meta_gradient": "reverse"}),
    "fused_forward_over_reverse": ("metaug", 2, {"metaug.virtual_step_from": "current",
                                                 "metaug.meta_gradient":
                                                 "forward_over_reverse"}),
    "first_order": ("metaug", 2, {"metaug.first_order": True}),
    # The legacy look-ahead steps amplify rounding (docs/metaug.md §5.3); a smaller virtual
    # step keeps 3 steps comparable.
    "legacy": ("metaug", 2, {"metaug.algorithm": "legacy", "metaug.inner_lr": 0.01}),
    "oucl_only": ("metaug_oucl_only", 2, {}),
    "code_exact": ("metaug", 3, {"metaug.margin_code_exact": True,
                                 "bank.schedule": "code_exact"}),
}


def make_method(variant: str):
  method_name, num_views, overrides = VARIANTS[variant]
  c = digits.get_config("tiny")
  c.method = method_name
  c.data.num_views = num_views
  c.model.width = 0.25
  c.model.embedding_dim = 8
  c.model.mag_hidden = 16
  c.batch_size = GLOBAL_BATCH
  c.bank.num_negatives = 8
  c.metaug.lambda_aug = 0.1
  c.metaug.lambda_mi = 0.1
  c.metaug.inner_lr = 0.1
  c.update_from_flattened_dict(overrides)
  facts = DataFacts(view_channels=(1,) * num_views, bank_size=BANK_SIZE, steps_per_epoch=1,
                    global_batch=GLOBAL_BATCH)
  return build(c, facts)


def batches(num_devices: int) -> list:
  """STEPS fixed global batches (uint8 8x8 images, distinct bank rows), split over devices."""
  rng = np.random.default_rng(20240601)
  out = []
  for _ in range(STEPS):
    images = rng.integers(0, 256, size=(GLOBAL_BATCH, IMAGE_SIDE, IMAGE_SIDE, 1), dtype=np.uint8)
    index = rng.permutation(BANK_SIZE)[:GLOBAL_BATCH].astype(np.int32)
    per = GLOBAL_BATCH // num_devices
    out.append({"image": images.reshape((num_devices, per) + images.shape[1:]),
                "index": index.reshape(num_devices, per)})
  return out


def run(variant: str, num_devices: int = 4):
  """(state after STEPS steps, [metrics of each step]) as numpy, the state from init key 0."""
  method = make_method(variant)
  views = tuple(jnp.zeros((2, 16, 16, 1), jnp.float32) for _ in range(method.num_views))
  state = method.init(jax.random.PRNGKey(0), views)
  step = parallel.pmap_step(method.train_step, jax.devices()[:num_devices], donate=False)
  metrics = []
  for batch in batches(num_devices):
    state, m = step(state, batch)
    metrics.append({k: _round(float(v)) for k, v in jax.device_get(m).items()})
  return jax.device_get(state), metrics


def _leaves(state) -> dict:
  """{path: array} over params, batch_stats, opt_state and banks (and step, rng)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def probe_vector(path: str, size: int) -> np.ndarray:
  """The fixed pseudo-random vector a leaf is dotted with (seeded by the leaf's path)."""
  return np.random.default_rng(zlib.crc32(path.encode())).standard_normal(size)


def _round(x: float) -> float:
  """12 significant digits: far below any tolerance, and a third of the file."""
  return float(f"{x:.12g}")


def fingerprints(state) -> dict:
  """{path: {shape, dtype, sum, sumsq, dot}} of every leaf, computed in float64."""
  out = {}
  for path, leaf in _leaves(state).items():
    x = np.asarray(leaf, np.float64).ravel()
    out[path] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "sum": _round(x.sum()),
                 "sumsq": _round(x @ x), "dot": _round(probe_vector(path, x.size) @ x)}
  return out


def part_of(path: str) -> str:
  """The part a leaf belongs to: params/batch_stats/opt_state of one model part, or banks."""
  head, _, rest = path.partition("]")
  return head + "]" if rest or head.endswith("']") else path


def relative_errors(got: dict, want: dict) -> dict:
  """{path: e}: the change of each leaf x in units of the norm of its part (`part_of`).

  e is the largest of |d sum| / sqrt(n), |d dot| / |r| and |d sumsq| / (2 |x|), divided by
  the part's norm; each of the three is at most |delta| for a change delta of x (the last to
  first order), so e is a lower bound of |delta| / |part| (0 for an equal leaf). Measured
  against the part rather than the leaf, because some leaves hold rounding noise only (the
  gradient of a bias right before a BatchNorm is zero up to rounding).
  """
  part_norms = {}
  for path, w in want.items():
    part_norms[part_of(path)] = part_norms.get(part_of(path), 0.0) + w["sumsq"]
  errors = {}
  for path, w in want.items():
    g = got[path]
    n = int(np.prod(w["shape"])) if w["shape"] else 1
    change = max(abs(g["sum"] - w["sum"]) / np.sqrt(n),
                 abs(g["dot"] - w["dot"]) / np.linalg.norm(probe_vector(path, n)),
                 abs(g["sumsq"] - w["sumsq"]) / (2 * max(np.sqrt(w["sumsq"]), 1e-30)))
    errors[path] = change / max(np.sqrt(part_norms[part_of(path)]), 1e-30)
  return errors


def metric_errors(got: list, want: list, skip_std: bool = False) -> dict:
  """{"step s: name": |d| / |value|} over every step's metrics (without the *_std ones, whose
  per-device values are pmean'd and so depend on the device count by definition)."""
  return {f"step {s + 1}: {k}": abs(g[k] - v) / max(abs(v), 1e-12)
          for s, (g, w) in enumerate(zip(got, want)) for k, v in w.items()
          if not (skip_std and k.endswith("_std"))}


def _worst(errors: dict, count: int = 3) -> str:
  top = sorted(errors, key=errors.get, reverse=True)[:count]
  return ", ".join(f"{errors[k]:.1e} {k}" for k in top)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=GOLDEN)
  parser.add_argument("--devices", default="",
                      help="a JSON file: run on 1 and on 4 devices, write both there and print "
                      "their differences instead of writing the golden file")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args()
  names = args.variants.split(",")
  if args.devices:
    runs = {}
    for name in names:
      four, m4 = run(name, 4)
      one, m1 = run(name, 1)
      runs[name] = {"1": {"state": fingerprints(one), "metrics": m1},
                    "4": {"state": fingerprints(four), "metrics": m4}}
      with open(args.devices, "w") as f:
        json.dump(runs, f)
      leaves = relative_errors(runs[name]["1"]["state"], runs[name]["4"]["state"])
      print(f"{name}: leaves {_worst(leaves)}\n  metrics "
            f"{_worst(metric_errors(m1, m4, skip_std=True))}", flush=True)
    return
  golden = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "steps": STEPS,
            "command": "python tests/golden/make_metaug_golden.py", "variants": {}}
  for name in names:
    state, metrics = run(name, 4)
    golden["variants"][name] = {"state": fingerprints(state), "metrics": metrics}
    print(name, "done", flush=True)
  with open(args.out, "w") as f:
    json.dump(golden, f, sort_keys=True)
    f.write("\n")
  print("wrote", args.out)


if __name__ == "__main__":
  main()
