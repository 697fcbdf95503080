"""Where the AlexNet-half step spends its time: each conv layer's passes, timed alone.

For every conv of the paper's encoder (spec 3.1) at the paper's batch, this times, one jitted
function each: the forward conv, its weight gradient, its input gradient and its forward-mode
tangent (the MetAug tangent pass: tangents in both the input and the weights), and reports
GFLOP/s next to a large matmul, the best this backend does on dense f32 arithmetic. conv1 is
timed for the three view widths (L: 1, ab: 2, Lab: 3 channels).

For the strided convs it also times the library's `models/patch_conv.py` (the kernel
derivative as batch-chunked GEMMs of space-to-depth patches), which `model.conv1_weight_grad`
selects for AlexNet-half's conv1 on CPU, and checks its weight gradient against XLA's.

    python experiments/conv_layers.py [--batch=64] [--repeats=5] [--md_out=FILE]
"""

import argparse
import datetime
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metaug_jax.models import patch_conv  # pylint: disable=g-import-not-at-top

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# (name, input side, input channels, kernel, stride, padding, output channels): spec 3.1.
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
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=DIMENSIONS)


def median_ms(fn, *args, repeats: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def matmul_gflops(repeats: int) -> float:
  a = jnp.ones((2048, 2048), jnp.float32)
  return 2 * 2048 ** 3 / median_ms(jnp.matmul, a, a, repeats=repeats) / 1e6


def measure(batch: int, repeats: int, chunk: int) -> list:
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


def render(rows, peak: float, meta: dict) -> str:
  rate = lambda gflop, ms: f"{gflop / ms * 1e3:.0f}"
  lines = [f"# AlexNet-half conv layers, one pass at a time ({meta['backend']})", "",
           "Command:", "", "```", meta["command"], "```", "",
           f"jax {meta['jax']}, {meta['cores']} CPU cores, batch {meta['batch']}, "
           f"median of {meta['repeats']} calls after one warm-up; {meta['date']}.", "",
           f"Reference: a 2048x2048 f32 matmul runs at **{peak:.0f} GFLOP/s**.", "",
           "| layer | GFLOP / pass | forward ms (GFLOP/s) | weight grad ms (GFLOP/s) | "
           "input grad ms (GFLOP/s) | tangent ms (jvp) | patch_conv: weight grad ms (GFLOP/s, "
           "rel. error) | patch_conv: tangent ms |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    g = r["gflop"]
    alt = (f"{r['patches_weight_grad']:.1f} ({rate(g, r['patches_weight_grad'])}, "
           f"{r['patches_rel_error']:.0e}) | {r['patches_tangent']:.1f}"
           if "patches_weight_grad" in r else "– | –")
    lines.append(f"| {r['layer']} | {g:.2f} | {r['forward']:.1f} ({rate(g, r['forward'])}) | "
                 f"{r['weight_grad']:.1f} ({rate(g, r['weight_grad'])}) | "
                 f"{r['input_grad']:.1f} ({rate(g, r['input_grad'])}) | {r['tangent']:.1f} | "
                 f"{alt} |")
  per_step = lambda part: (sum(r[part] for r in rows[:3])
                           + 3 * sum(r[part] for r in rows[3:]))
  conv1 = lambda part: sum(r[part] for r in rows[:3])
  lines += ["", "One plain step's convs, summed over the three views' encoders (conv1 once "
            "per width, conv2-5 three times; conv1 needs no input gradient): "
            f"forward {per_step('forward'):.0f} ms, weight gradients "
            f"{per_step('weight_grad'):.0f} ms, of which conv1 {conv1('weight_grad'):.0f} ms "
            f"({conv1('patches_weight_grad'):.0f} ms with patch_conv), input gradients "
            f"{3 * sum(r['input_grad'] for r in rows[3:]):.0f} ms.", ""]
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--chunk", type=int, default=patch_conv.DEFAULT_CHUNK,
                 help="images per GEMM in patch_conv")
  p.add_argument("--md_out", default="")
  args = p.parse_args(argv)
  meta = {"backend": jax.default_backend(), "jax": jax.__version__, "cores": os.cpu_count(),
          "batch": args.batch, "repeats": args.repeats,
          "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
          "command": shlex.join(["python", "experiments/conv_layers.py"] + sys.argv[1:])}
  peak = matmul_gflops(args.repeats)
  report = render(measure(args.batch, args.repeats, args.chunk), peak, meta)
  print(report)
  if args.md_out:
    with open(args.md_out, "w") as f:
      f.write(report)


if __name__ == "__main__":
  main()
