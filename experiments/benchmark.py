"""Step-time, compile-time and memory benchmark of the contrastive steps, side by side.

One command measures every setting (encoder x batch x step), each in a fresh subprocess so
that the process's peak RSS belongs to that setting alone, and writes one markdown table and
one JSON file:

  python experiments/benchmark.py --md_out=experiments/results/benchmark_cpu.md \
      --json_out=experiments/results/benchmark_cpu.json

  python experiments/benchmark.py --only=anchor --json_out=/tmp/anchor.json   # paper anchor
  python experiments/benchmark.py --only=steps --encoders=digits_conv --steps=3  # quick look
  python experiments/benchmark.py --only=anchor --methods=cmc,metaug_fused  # some steps only
  python experiments/benchmark.py --only=methods --encoders=digits_conv,resnet18 \
      --methods=simsiam,simsiam_hai,byol,byol_hai,barlow_twins,barlow_hai   # HAI beside plain

Sections (`--only`, comma-separated; default all):
  steps    each encoder at a few batch sizes: `cmc` (the plain contrastive step; also
           `simclr` for the digits encoder), `metaug_oucl_only`, `metaug` (the paper-ordered
           step, our default), `metaug_fused` (virtual step from the current weights, so
           Phase A's gradient is the inner one) and `metaug_double_backward` (the
           meta-gradient as jax.grad of jax.grad instead of forward-over-reverse), 1 device;
           also `cmc_ynnpack` and `metaug_fused_ynnpack`, the same steps with XLA:CPU's
           convolutions on the jaxlib's default kernels (YNNPACK in jaxlib 0.10-0.11) rather
           than on Eigen's (`config.xla_cpu_conv_library`, default "eigen");
  anchor   the paper's setting (three AlexNet-half encoders at 224x224, batch 64, K=1024
           negatives, a bank of N=5000 rows, `metaug.algorithm=paper`) next to the authors'
           PyTorch numbers on a 2-core machine; also `metaug_fused_remat` (model.remat),
           `metaug_lean` and `metaug_fused_lean` (model.remat and xla_cpu_scheduler=memory),
           `metaug_fused_lean_nocse` (the same with xla_cse=False, so that XLA:CPU keeps
           the rematerialisation), and the `_ynnpack` steps (jaxlib's default conv kernels);
  scaling  one global batch on 1, 2, 4, 8 devices (simulated CPU devices when there is no
           accelerator: those share the same cores, so this measures overhead, not speed-up);
  parts    where a MetAug step's time goes: the views, Phase A (encoder step objective with
           the MAGs frozen) and Phase B (the second-order MAG meta-gradient), each compiled
           and timed alone, next to the full step;
  methods  every registered method (metaug_jax/methods/, the paper's baselines included) on
           the digits encoder and the 32x32 AlexNet, each with its config variant (the
           Siamese baselines: two RGB crops through one shared encoder), with its step time
           and memory as a ratio to the plain `cmc` step on the same encoder and batch; each
           hierarchical-augmentation method (simsiam_hai, byol_hai, barlow_hai) right after
           its plain baseline with their step-time ratio, on the digits encoder and (pairs
           only, batch 32) on resnet18 at 32x32; `--methods` keeps some rows only.

Per setting: lower and compile time of the pmapped step (`.lower().compile()`; the compiled
executable is what runs afterwards, so nothing compiles twice), the median seconds per step
over `--steps` timed steps after `--warmup` untimed ones (each `jax.block_until_ready`),
steps/s and images/s, XLA's flop count and `memory_analysis()` (temp / argument bytes of the
compiled step), `device.memory_stats()` where the backend has it (GPU/TPU), and the worker
process's peak RSS (`ru_maxrss`) with its RSS before the step was built. Like the training
loop (`train.compile_step`), the worker releases freed host memory (`host_memory.release`)
before and after compiling; the XLA settings (`xla_cpu_scheduler`, `xla_cse`,
`xla_cpu_conv_library`) are applied by `train.build_experiment` before JAX starts its
backend, from the setting's config alone (a conv-kernel choice in XLA_FLAGS is dropped).

The data are synthetic uint8 images of the right shape (no download): 1437 8x8 grey images
for the digits encoder (the size of the digits training split), 5000 32x32 RGB images
otherwise (upsampled to 224 by the views for AlexNet-half); the memory bank has one row per
image.

This file is the command line; `benchmark_plan.py` says which settings run,
`benchmark_worker.py` measures one setting in its own process, and `benchmark_report.py` writes
the tables.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time

from benchmark_plan import ENCODERS, STEP_METHODS, Setting, plan
from benchmark_report import render_markdown
from benchmark_worker import ROOT, machine_load, probe_platform, run_in_subprocess, worker_main


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Step-time / memory benchmark (see module doc).")
  p.add_argument("--only", default="steps,anchor,scaling,parts,methods",
                 help="comma list of sections: steps, anchor, scaling, parts, methods")
  p.add_argument("--encoders", default=",".join(ENCODERS), help="comma list of encoders")
  p.add_argument("--methods", default="",
                 help="only these steps in the steps/anchor/methods sections, e.g. "
                      "'cmc,metaug_fused' "
                      f"(default: the plain steps and {', '.join(STEP_METHODS)})")
  p.add_argument("--batches", default="",
                 help="per-encoder batches, e.g. 'digits_conv=64/128;alexnet_small=32'")
  p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--anchor_steps", type=int, default=2, help="timed steps of the anchor")
  p.add_argument("--scaling_devices", default="1,2,4,8")
  p.add_argument("--scaling_encoder", default="digits_conv")
  p.add_argument("--scaling_batch", type=int, default=128)
  p.add_argument("--scaling_methods", default="cmc,metaug")
  p.add_argument("--override", action="append", default=[],
                 help="config override for every setting, e.g. metaug.first_order=True")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per setting")
  p.add_argument("--json_out", default="", help="write every result here (updated as it runs)")
  p.add_argument("--md_out", default="", help="write the markdown report here")
  p.add_argument("--resume", action="store_true",
                 help="reuse the successful results already in --json_out")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker_main(Setting.from_json(args.worker))
    return
  start = time.time()
  meta = {"command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
          "python": platform.python_version(), "platform": probe_platform(),
          "load_start": machine_load()}
  batches = {}
  for part in filter(None, args.batches.split(";")):
    name, values = part.split("=")
    batches[name.strip()] = tuple(int(v) for v in values.split("/"))
  from metaug_jax.config_base import parse_literal  # pylint: disable=g-import-not-at-top
  overrides = tuple((k.strip(), parse_literal(v.strip()))
                    for k, v in (o.split("=", 1) for o in args.override))
  accel = meta["platform"]["count"] if meta["platform"]["platform"] != "cpu" else 0
  todo = plan(set(args.only.split(",")), [e for e in args.encoders.split(",") if e], batches,
              args.steps, args.warmup, args.anchor_steps,
              [int(n) for n in args.scaling_devices.split(",")], args.scaling_encoder,
              args.scaling_batch, args.scaling_methods.split(","), accel, overrides)
  if args.methods:
    keep = set(args.methods.split(","))
    todo = [s for s in todo if s.kind not in ("steps", "anchor", "methods") or s.method in keep]
  results = {}
  if args.resume and args.json_out and os.path.exists(args.json_out):
    results = {k: v for k, v in json.load(open(args.json_out))["results"].items()
               if "error" not in v["result"]}
  for i, setting in enumerate(todo):
    if setting.key in results:
      print(f"[{i + 1}/{len(todo)}] {setting.key}: reused", flush=True)
      continue
    print(f"[{i + 1}/{len(todo)}] {setting.key} ...", end=" ", flush=True)
    result = run_in_subprocess(setting, args.timeout)
    results[setting.key] = {"setting": setting.to_json(), "result": result}
    summary = result.get("error") or (
        f"{result['step_s']:.3f} s/step, compile {result['lower_s'] + result['compile_s']:.1f}"
        f" s, peak RSS {result['peak_rss_mib']:.0f} MiB" if "step_s" in result
        else f"parts done in {result['wall_s']:.0f} s")
    print(summary, flush=True)
    if args.json_out:
      _write_json(args.json_out, meta, results)
  meta["load_end"] = machine_load()
  meta["wall_min"] = (time.time() - start) / 60
  if args.json_out:
    _write_json(args.json_out, meta, results)
  # Order the report as planned (resumed results keep their place).
  ordered = {s.key: results[s.key] for s in todo if s.key in results}
  report = render_markdown(ordered, meta)
  print("\n" + report)
  if args.md_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.md_out)), exist_ok=True)
    with open(args.md_out, "w") as f:
      f.write(report + "\n")


def _write_json(path: str, meta: dict, results: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  os.replace(tmp, path)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)  # the repository's metaug_jax, installed or not
  main()
