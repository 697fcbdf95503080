"""Does MetAug's meta-gradient survive reduced-precision matmuls? (TF32 on GPUs, bf16 passes on TPUs)

The MAG gradient is a direct part plus a second-order part through the virtual encoder step,
and the second-order part is orders of magnitude smaller (digits: 1e-3 to 1e-6 of the direct
part). This script computes both parts on the same tiny inputs (one batch of a config, the
initial state, the same bank draws) at each `model.matmul_precision` on the default device,
and compares them with a float64 reference computed on the CPU in a subprocess.

  python experiments/meta_gradient_precision.py --config=configs/digits.py \
      --config.metaug.inner_lr=0.1 --config.batch_size=64 \
      --out=experiments/results/meta_gradient_precision_cpu.md

The table gives, per precision and part, the relative error ||g - g64|| / ||g64||, the cosine
to the reference, the second-order/direct norm ratio and the time of one meta-gradient (the
cost of the precision). On a CPU every precision computes in
full float32 (the rows agree); the question is answered on a GPU or TPU.
"""

import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a MetAug setup).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", "", "Markdown file for the table (and the command).")
_PRECISIONS = flags.DEFINE_list("precisions", ["default", "high", "highest"],
                                "model.matmul_precision values to measure.")
_REFERENCE_IN = flags.DEFINE_string("reference_in", "", "Internal: inputs for the float64 run.")
_REFERENCE_OUT = flags.DEFINE_string("reference_out", "", "Internal: where it writes its parts.")


def _gradient_parts_fn(method):
  """jitted (state, views, index) -> (direct, second-order) MAG gradient parts, computed the
  way the training step's Phase B computes them (`MetaFeatureGenerators.outer_gradient`, as
  config.metaug selects), on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  from metaug_jax import parallel  # pylint: disable=g-import-not-at-top
  from metaug_jax.methods import common, metaug  # pylint: disable=g-import-not-at-top

  def one_device(state, views, index):
    keys = common.step_keys(state, ("augment",) + metaug.meta_gradient.PHASES)
    inputs = metaug.StepInputs(
        views=views, global_index=parallel.gather_rows(index), step=state.step,
        indices=lambda phase: method.draw_call_indices(keys[phase], index),
        augmenter_keys=lambda phase: jax.random.split(keys[phase], method.num_calls))
    theta = state.params["encoder"]
    parts = method.generators.outer_gradient(method.objective(state, inputs), theta, theta,
                                             state.params["mag"], state.banks)
    return parallel.pmean((parts.direct, parts.second))

  mapped = jax.vmap(one_device, in_axes=(None, 0, 0), axis_name=parallel.AXIS)
  return jax.jit(lambda s, v, i: jax.tree.map(lambda x: x[0], mapped(s, v, i)))


def _inputs(config):
  """(method, state, views, index) in float32 numpy: the initial state and one batch's views."""
  import jax  # pylint: disable=g-import-not-at-top
  from metaug_jax import parallel, train  # pylint: disable=g-import-not-at-top
  from metaug_jax.methods import common  # pylint: disable=g-import-not-at-top

  config.num_devices = 1
  exp = train.build_experiment(config)
  state = exp.init_state()
  batch = exp.loader.batch_at(0)
  key = common.step_keys(state, ("augment",))["augment"]
  views = jax.vmap(lambda images: common.train_views(images, key, config.data),
                   axis_name=parallel.AXIS)(batch["image"])
  return exp.method, jax.device_get(state), jax.device_get(views), batch["index"]


def _reference(config) -> None:
  """The float64 run (own process: JAX_ENABLE_X64, CPU): reads the inputs, writes the parts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metaug_jax import methods  # pylint: disable=g-import-not-at-top
  from metaug_jax.models import encoders  # pylint: disable=g-import-not-at-top

  assert jax.config.jax_enable_x64 and jax.default_backend() == "cpu"
  with open(_REFERENCE_IN.value, "rb") as f:
    facts, state, views, index = pickle.load(f)
  encoders._DTYPES["float64"] = jnp.float64  # pylint: disable=protected-access
  config.model.dtype = "float64"
  method = methods.build(config, facts)
  wide = lambda x: np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype,
                                                              np.floating) else x
  state, views = jax.tree.map(wide, (state, views))
  direct, second = jax.device_get(_gradient_parts_fn(method)(state, views, index))
  with open(_REFERENCE_OUT.value, "wb") as f:
    pickle.dump((direct, second), f)


def _flat(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _compare(part, reference) -> tuple:
  """(relative error, cosine) of a gradient part against its float64 reference."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = _flat(part), _flat(reference)
  norm = np.linalg.norm(b)
  return (float(np.linalg.norm(a - b) / max(norm, 1e-300)),
          float(a @ b / max(np.linalg.norm(a) * norm, 1e-300)))


def measure(config, precisions) -> tuple:
  """Rows (precision, part, rel. error, cosine, norm, second/direct ratio, ms), the
  reference's second/direct ratio and its direct part's norm."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metaug_jax import parallel  # pylint: disable=g-import-not-at-top

  method, state, views, index = _inputs(config)
  with tempfile.TemporaryDirectory() as tmp:
    inputs, outputs = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
    with open(inputs, "wb") as f:
      pickle.dump((method.facts, state, views, index), f)
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    argv = [a for a in sys.argv[1:] if not a.startswith(("--out", "--precisions"))]
    subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                    f"--reference_in={inputs}", f"--reference_out={outputs}"],
                   env=env, check=True)
    with open(outputs, "rb") as f:
      ref_direct, ref_second = pickle.load(f)
  rows = []
  ref_ratio = np.linalg.norm(_flat(ref_second)) / np.linalg.norm(_flat(ref_direct))
  for precision in precisions:
    fn = _gradient_parts_fn(method)
    with parallel.matmul_precision(precision):
      direct, second = jax.device_get(fn(state, views, index))  # compiles
      times = []
      for _ in range(5):
        started = time.perf_counter()
        jax.block_until_ready(fn(state, views, index))
        times.append(time.perf_counter() - started)
    ms = 1e3 * sorted(times)[len(times) // 2]
    ratio = np.linalg.norm(_flat(second)) / np.linalg.norm(_flat(direct))
    for name, part, ref in (("direct", direct, ref_direct), ("second-order", second, ref_second)):
      err, cos = _compare(part, ref)
      rows.append((precision, name, err, cos, float(np.linalg.norm(_flat(part))), ratio, ms))
  return rows, float(ref_ratio), float(np.linalg.norm(_flat(ref_direct)))


def format_table(rows, ref_ratio: float, device: str) -> str:
  from metaug_jax.evaluation.tables import markdown_table  # pylint: disable=g-import-not-at-top
  head = ["precision", "part", "rel. error vs float64", "cosine", "norm", "second / direct",
          "ms per meta-gradient (median of 5)"]
  body = [[p, part, f"{err:.2e}", f"{cos:.6f}", f"{norm:.4g}", f"{ratio:.3g}", f"{ms:.3g}"]
          for p, part, err, cos, norm, ratio, ms in rows]
  return markdown_table(
      head, body, f"MAG gradient parts at each matmul precision on {device}, against a float64 "
                  f"CPU reference (second-order / direct norm ratio of the reference: "
                  f"{ref_ratio:.3g})\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _REFERENCE_IN.value:
    _reference(config)
    return
  import jax  # pylint: disable=g-import-not-at-top
  if config.method != "metaug":
    raise app.UsageError("the MAG gradient needs --config.method=metaug")
  start = time.time()
  rows, ref_ratio, _ = measure(config, _PRECISIONS.value)
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__})"
  table = format_table(rows, ref_ratio, device)
  print(table)
  if _OUT.value:
    command = shlex.join(["python", "experiments/meta_gradient_precision.py", *sys.argv[1:]])
    with open(_OUT.value, "w") as f:
      f.write(f"# Meta-gradient precision\n\nCommand: `{command}`\n\n{table}\n\n"
              f"Wall time {time.time() - start:.0f} s.\n")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  flags.mark_flags_as_required(["config"])
  app.run(main)
