"""Where the AlexNet-half step spends its time: each conv layer's passes, timed alone.

For every conv of the paper's encoder (docs/metaug.md §3.1) at the paper's batch, this times,
one jitted function each: the forward conv, its weight gradient, its input gradient and its
forward-mode tangent (the MetAug tangent pass: tangents in both the input and the weights), and
reports
GFLOP/s next to a large matmul, the best this backend does on dense f32 arithmetic. conv1 is
timed for the three view widths (L: 1, ab: 2, Lab: 3 channels).

It does so once per XLA:CPU convolution library (`config.xla_cpu_conv_library`), each in its
own subprocess because XLA reads that choice from XLA_FLAGS when its backend starts:
"eigen" (XLA's Eigen kernels, our default) and "xla_default" (the jaxlib's own choice,
YNNPACK in jaxlib 0.10-0.11).

For the strided convs it also times the library's `models/patch_conv.py` (the kernel
derivative as batch-chunked GEMMs of space-to-depth patches), which `model.conv1_weight_grad`
selects for AlexNet-half's conv1 on CPU when the convs run on YNNPACK, and checks its weight
gradient against XLA's.

    python experiments/conv_layers.py [--batch=64] [--repeats=5] [--md_out=FILE]
        [--libraries=eigen,xla_default]
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from metaug_jax.evaluation.tables import table_lines  # noqa: E402  (no jax: it starts nothing)

RESULT_TAG = "CONV_LAYERS_RESULT "
LIBRARIES = ("eigen", "xla_default")
LIBRARY_LABEL = {"eigen": "Eigen (xla_cpu_conv_library=eigen, our default)",
                 "xla_default": "the jaxlib's default (xla_cpu_conv_library=xla_default: "
                                "YNNPACK in jaxlib 0.10-0.11)"}

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# The table of docs/metaug.md §3.1: (name, input side, input channels, kernel, stride, padding,
# output channels).
LAYERS = (
    ("conv1 (L)", 224, 1, 11, 4, 2, 48),
    ("conv1 (ab)", 224, 2, 11, 4, 2, 48),
    ("conv1 (Lab)", 224, 3, 11, 4, 2, 48),
    ("conv2", 27, 48, 5, 1, 2, 128),
    ("conv3", 13, 128, 3, 1, 1, 192),
    ("conv4", 13, 192, 3, 1, 1, 192),
    ("conv5", 13, 192, 3, 1, 1, 128),
)


def conv(x, w, stride, pad):
  import jax  # pylint: disable=g-import-not-at-top  (workers only: after XLA_FLAGS is set)
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=DIMENSIONS)


def median_ms(fn, *args, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def matmul_gflops(repeats: int) -> float:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((2048, 2048), jnp.float32)
  return 2 * 2048 ** 3 / median_ms(jnp.matmul, a, a, repeats=repeats) / 1e6


def measure(batch: int, repeats: int, chunk: int) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from metaug_jax.models import patch_conv  # pylint: disable=g-import-not-at-top
  rows = []
  key = jax.random.PRNGKey(0)
  for name, side, cin, k, s, p, cout in LAYERS:
    kx, kw, kd, kt = jax.random.split(jax.random.fold_in(key, len(rows)), 4)
    x = jax.random.normal(kx, (batch, side, side, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) * 0.05
    dw = jax.random.normal(kt, w.shape) * 0.05
    out_side = (side + 2 * p - k) // s + 1
    dy = jax.random.normal(kd, (batch, out_side, out_side, cout))
    gflop = 2 * batch * out_side ** 2 * cout * k * k * cin / 1e9
    row = {"layer": name, "gflop": gflop}
    xla = lambda x, w: conv(x, w, s, p)
    patches = lambda x, w: patch_conv.conv(x, w, (s, s), ((p, p), (p, p)), chunk=chunk)
    weight_grad = lambda f: lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]
    # The MetAug tangent pass: the kernel's tangent is v; the input's is the layer below's
    # (none for conv1, whose input is the image).
    if name.startswith("conv1"):
      tangent = lambda f: lambda x, w, dw: jax.jvp(lambda w: f(x, w), (w,), (dw,))[1]
    else:
      tangent = lambda f: lambda x, w, dw: jax.jvp(f, (x, w), (x * 0.5, dw))[1]
    row["forward"] = median_ms(xla, x, w, repeats=repeats)
    row["weight_grad"] = median_ms(weight_grad(xla), x, w, dy, repeats=repeats)
    row["input_grad"] = median_ms(
        lambda x, w, dy: jax.vjp(lambda x: xla(x, w), x)[1](dy)[0], x, w, dy, repeats=repeats)
    row["tangent"] = median_ms(tangent(xla), x, w, dw, repeats=repeats)
    if s > 1:
      row["patches_weight_grad"] = median_ms(weight_grad(patches), x, w, dy, repeats=repeats)
      row["patches_tangent"] = median_ms(tangent(patches), x, w, dw, repeats=repeats)
      ref = jax.jit(weight_grad(xla))(x, w, dy)
      got = jax.jit(weight_grad(patches))(x, w, dy)
      row["patches_rel_error"] = float(jnp.abs(ref - got).max() / jnp.abs(ref).max())
    rows.append(row)
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "layer"),
          file=sys.stderr, flush=True)
  return rows


def _library_section(library: str, result: dict) -> list:
  rows, peak = result["rows"], result["matmul_gflops"]
  rate = lambda gflop, ms: f"{gflop / ms * 1e3:.0f}"
  lines = [f"## Convolutions on {LIBRARY_LABEL.get(library, library)}", "",
           f"XLA_FLAGS: `{result['xla_flags'] or '(none)'}`. Reference: a 2048x2048 f32 matmul "
           f"runs at **{peak:.0f} GFLOP/s**.", ""]
  head = ["layer", "GFLOP / pass", "forward ms (GFLOP/s)", "weight grad ms (GFLOP/s)",
          "input grad ms (GFLOP/s)", "tangent ms (jvp)",
          "patch_conv: weight grad ms (GFLOP/s, rel. error)", "patch_conv: tangent ms"]
  body = []
  for r in rows:
    g = r["gflop"]
    alt = ([f"{r['patches_weight_grad']:.1f} ({rate(g, r['patches_weight_grad'])}, "
            f"{r['patches_rel_error']:.0e})", f"{r['patches_tangent']:.1f}"]
           if "patches_weight_grad" in r else ["–", "–"])
    body.append([r["layer"], f"{g:.2f}", f"{r['forward']:.1f} ({rate(g, r['forward'])})",
                 f"{r['weight_grad']:.1f} ({rate(g, r['weight_grad'])})",
                 f"{r['input_grad']:.1f} ({rate(g, r['input_grad'])})", f"{r['tangent']:.1f}",
                 *alt])
  lines += table_lines(head, body)
  lines += ["", "One plain step's convs, summed over the three views' encoders (conv1 once "
            "per width, conv2-5 three times; conv1 needs no input gradient): "
            f"forward {_per_step(rows, 'forward'):.0f} ms, weight gradients "
            f"{_per_step(rows, 'weight_grad'):.0f} ms, of which conv1 "
            f"{_conv1(rows, 'weight_grad'):.0f} ms ({_conv1(rows, 'patches_weight_grad'):.0f} "
            f"ms with patch_conv), input gradients {_input_grads(rows):.0f} ms.", ""]
  return lines


def _per_step(rows, part: str) -> float:
  return sum(r[part] for r in rows[:3]) + 3 * sum(r[part] for r in rows[3:])


def _conv1(rows, part: str) -> float:
  return sum(r[part] for r in rows[:3])


def _input_grads(rows) -> float:
  """conv2-5's input gradients over the three views (conv1 needs none)."""
  return _per_step(rows, "input_grad") - _conv1(rows, "input_grad")


def render(results: dict, meta: dict) -> str:
  """The report: one table per library, then their totals side by side."""
  lines = ["# AlexNet-half conv layers, one pass at a time (cpu)", "",
           "Command:", "", "```", meta["command"], "```", "",
           f"jax {meta['jax']}, {meta['cores']} CPU cores, batch {meta['batch']}, median of "
           f"{meta['repeats']} calls after one warm-up, each library in its own process, one "
           f"after the other; {meta['date']}.", ""]
  for library, result in results.items():
    lines += _library_section(library, result)
  if {"eigen", "xla_default"} <= set(results):
    eigen, default = results["eigen"]["rows"], results["xla_default"]["rows"]
    body = []
    for part, label in (("forward", "forward"), ("weight_grad", "weight gradients"),
                        ("input_grad", "input gradients"), ("tangent", "tangents (jvp)")):
      total = _input_grads if part == "input_grad" else lambda rows, p=part: _per_step(rows, p)
      e, d = total(eigen), total(default)
      body.append([label, f"{e:.0f}", f"{d:.0f}", f"{d / e:.2f}x"])
    lines += ["## Side by side", "", *table_lines(
        ["one plain step's convs", "Eigen ms", "jaxlib default ms", "default / Eigen"], body)]
    lines.append("")
  return "\n".join(lines)


def worker(library: str, batch: int, repeats: int, chunk: int) -> None:
  """Measures every layer with `library`'s kernels; prints one tagged JSON line."""
  from metaug_jax import xla_runtime  # pylint: disable=g-import-not-at-top
  os.environ["XLA_FLAGS"] = xla_runtime.without_flag(xla_runtime.YNN_FUSION_FLAG)
  xla_runtime.apply_xla_cpu_conv_library(library)   # before jax starts its backend
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.default_backend() == "cpu", "this table is about XLA:CPU's conv kernels"
  result = {"rows": measure(batch, repeats, chunk), "matmul_gflops": matmul_gflops(repeats),
            "xla_flags": os.environ["XLA_FLAGS"], "jax": jax.__version__}
  print(RESULT_TAG + json.dumps(result), flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  from metaug_jax.models import patch_conv  # pylint: disable=g-import-not-at-top
  p.add_argument("--chunk", type=int, default=patch_conv.DEFAULT_CHUNK,
                 help="images per GEMM in patch_conv")
  p.add_argument("--libraries", default=",".join(LIBRARIES),
                 help=f"comma-separated, from {LIBRARIES}")
  p.add_argument("--md_out", default="")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    worker(args.worker, args.batch, args.repeats, args.chunk)
    return
  libraries = [l for l in args.libraries.split(",") if l]
  unknown = sorted(set(libraries) - set(LIBRARIES))
  if unknown:
    p.error(f"unknown --libraries {unknown}; choose from {LIBRARIES}")
  meta = {"cores": os.cpu_count(), "batch": args.batch, "repeats": args.repeats,
          "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
          "command": shlex.join(["python", "experiments/conv_layers.py"] + sys.argv[1:])}
  results = {}
  for library in libraries:
    print(f"measuring with {library} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={library}",
           f"--batch={args.batch}", f"--repeats={args.repeats}", f"--chunk={args.chunk}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
      sys.exit(f"the {library} worker failed (exit code {proc.returncode}); see its stderr")
    results[library] = json.loads(lines[-1][len(RESULT_TAG):])
  meta["jax"] = next(iter(results.values()))["jax"]
  report = render(results, meta)
  print(report)
  if args.md_out:
    with open(args.md_out, "w") as f:
      f.write(report)


if __name__ == "__main__":
  main()
