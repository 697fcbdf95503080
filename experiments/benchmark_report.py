"""The benchmark's report: one markdown document with a table per measured section."""

import platform

from benchmark_plan import ANCHOR, HAI_BASELINES, STEP_VARIANTS, Setting, overrides_suffix
from metaug_jax.evaluation.tables import table_lines

# The authors' PyTorch code on a 2-core CPU machine (the brief's reference measurements).
PAPER = {
    "metaug": {"s_per_step": 11.98, "images_per_s": 5.3, "peak_rss_gib": 4.5},
    "metaug_oucl_only": {"s_per_step": 1.78, "images_per_s": 36.0, "peak_rss_gib": 1.6},
    "ratio": 7.25,
}


def _f(value, fmt: str = ".3f", missing: str = "–") -> str:
  return missing if value is None else format(value, fmt)


def _s(seconds, missing: str = "–") -> str:
  """Seconds with three decimals, or three significant digits below 0.1 s (accelerators)."""
  if seconds is None:
    return missing
  return format(seconds, ".3f") if seconds >= 0.1 else format(seconds, ".3g")


def _steps_table(rows) -> list:
  head = ["encoder", "input, views", "batch", "step", "compile s", "s / step", "steps / s",
          "images / s", "cores used", "GFLOP / step", "GFLOP/s", "XLA temp MiB", "XLA args MiB",
          "peak RSS MiB (+ over pre-step)", "device peak MiB"]
  body = []
  for s, r in rows:
    if "error" in r:
      body.append([s.encoder, "", s.batch, s.label, f"error: {r['error'][:200]}"])
      continue
    dev = r.get("device_memory") or {}
    peak_dev = dev.get("peak_bytes_in_use")
    body.append([
        s.encoder, f"{r['input_size']}², {r['views']}", str(s.batch), s.label,
        _f(r["lower_s"] + r["compile_s"], ".1f"), _s(r["step_s"]), _f(r["steps_per_s"], ".2f"),
        _f(r["images_per_s"], ".1f"), _f(r.get("cores_used"), ".2f"), _f(r["gflops"], ".1f"),
        _f(r["gflops"] / r["step_s"] if r["gflops"] else None, ".1f"), _f(r["temp_mib"], ".0f"),
        _f(r["argument_mib"], ".0f"),
        f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['rss_before_step_mib']:.0f})",
        _f(peak_dev / 2 ** 20 if peak_dev else None, ".0f", "n/a")])
  return table_lines(head, body)


def _ratio_table(rows) -> list:
  by = {}
  for s, r in rows:
    if "error" not in r:
      by.setdefault((s.encoder, s.batch, s.overrides), {})[s.method] = r["step_s"]
  head = ["encoder", "batch", "simclr s", "cmc s", "oucl_only s", "metaug s", "fused s",
          "double-backward s", "**metaug / cmc**", "**fused / cmc**", "double-backward / cmc",
          "metaug / oucl_only", "fused / oucl_only", "oucl_only / cmc",
          "cmc: YNNPACK / Eigen convs", "fused: YNNPACK / Eigen convs"]
  body = []
  ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "–"
  for (encoder, batch, overrides), t in by.items():
    body.append([
        encoder + overrides_suffix(overrides), str(batch), _s(t.get("simclr")),
        _s(t.get("cmc")), _s(t.get("metaug_oucl_only")), _s(t.get("metaug")),
        _s(t.get("metaug_fused")), _s(t.get("metaug_double_backward")),
        "**" + ratio(t.get("metaug"), t.get("cmc")) + "**",
        "**" + ratio(t.get("metaug_fused"), t.get("cmc")) + "**",
        ratio(t.get("metaug_double_backward"), t.get("cmc")),
        ratio(t.get("metaug"), t.get("metaug_oucl_only")),
        ratio(t.get("metaug_fused"), t.get("metaug_oucl_only")),
        ratio(t.get("metaug_oucl_only"), t.get("cmc")),
        ratio(t.get("cmc_ynnpack"), t.get("cmc")),
        ratio(t.get("metaug_fused_ynnpack"), t.get("metaug_fused"))])
  return table_lines(head, body)


def _methods_table(rows) -> list:
  """A row per method: step time and memory, and their ratios to cmc's on the same setting;
  a *_hai row's step time also as a ratio to its plain baseline's ("vs plain")."""
  cmc = {(s.encoder, s.batch): r for s, r in rows if s.method == "cmc" and "error" not in r}
  ok = {(s.encoder, s.batch, s.method): r for s, r in rows if "error" not in r}
  head = ["encoder", "batch", "method", "views", "s / step", "step / cmc", "vs plain",
          "XLA temp MiB", "temp / cmc", "peak RSS MiB", "RSS / cmc", "compile s"]
  body = []
  ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "–"
  for s, r in rows:
    if "error" in r:
      body.append([s.encoder, s.batch, s.label, f"error: {r['error'][:200]}"])
      continue
    base = cmc.get((s.encoder, s.batch), {})
    plain = ok.get((s.encoder, s.batch, HAI_BASELINES.get(s.method)), {})
    vs_plain = (f"{ratio(r['step_s'], plain.get('step_s'))} {HAI_BASELINES[s.method]}"
                if plain else "–")
    body.append([
        s.encoder, str(s.batch), s.label, str(r["views"]), _s(r["step_s"]),
        ratio(r["step_s"], base.get("step_s")), vs_plain, _f(r["temp_mib"], ".0f"),
        ratio(r["temp_mib"], base.get("temp_mib")), _f(r["peak_rss_mib"], ".0f"),
        ratio(r["peak_rss_mib"], base.get("peak_rss_mib")),
        _f(r["lower_s"] + r["compile_s"], ".1f")])
  return table_lines(head, body)


def _anchor_table(rows) -> list:
  got = {s.method: r for s, r in rows if s.kind == "anchor" and "error" not in r}
  head = ["step", "ours s / step", "ours images / s", "ours peak RSS GiB",
          "authors s / step", "authors images / s", "authors peak RSS GiB",
          "ours / authors images/s", "ours / authors peak RSS"]
  body = []
  for method, label, paper_key in (
      ("metaug", "MetAug (paper step, forward-over-reverse; our default)", "metaug"),
      ("metaug_fused", "MetAug, virtual step from the current theta (fused)", "metaug"),
      ("metaug_double_backward", "MetAug (paper step, jax.grad of jax.grad)", "metaug"),
      ("metaug_fused_remat", "MetAug fused, model.remat=True", "metaug"),
      ("metaug_lean", "MetAug, remat + xla_cpu_scheduler=memory", "metaug"),
      ("metaug_fused_lean", "MetAug fused, remat + xla_cpu_scheduler=memory", "metaug"),
      ("metaug_fused_lean_nocse", "MetAug fused, remat + xla_cpu_scheduler=memory + "
       "xla_cse=False", "metaug"),
      ("metaug_ynnpack", "MetAug (paper step), convs on the jaxlib's default kernels "
       "(YNNPACK)", "metaug"),
      ("metaug_fused_ynnpack", "MetAug fused, convs on the jaxlib's default kernels (YNNPACK)",
       "metaug"),
      ("metaug_oucl_only", "plain 3-view OUCL (metaug_oucl_only)", "metaug_oucl_only"),
      ("metaug_oucl_only_ynnpack", "plain 3-view OUCL, convs on the jaxlib's default kernels "
       "(YNNPACK)", "metaug_oucl_only")):
    r, p = got.get(method), PAPER[paper_key]
    if r is None:
      body.append([label, "not measured", "", "", p["s_per_step"], p["images_per_s"],
                   f"~{p['peak_rss_gib']}"])
      continue
    rss = r["peak_rss_mib"] / 1024
    body.append([
        label, _s(r["step_s"]), _f(r["images_per_s"], ".2f"), _f(rss, ".2f"),
        str(p["s_per_step"]), str(p["images_per_s"]), f"~{p['peak_rss_gib']}",
        f"**{r['images_per_s'] / p['images_per_s']:.2f}x**",
        f"**{rss / p['peak_rss_gib']:.2f}x**"])
  theirs_implied = PAPER["metaug"]["s_per_step"] / PAPER["metaug_oucl_only"]["s_per_step"]
  for method in ("metaug",) + tuple(STEP_VARIANTS):
    # A step's own plain OUCL: the one with the same conv kernels.
    plain = "metaug_oucl_only_ynnpack" if method.endswith("_ynnpack") else "metaug_oucl_only"
    if method.startswith("metaug") and method != plain and method in got and plain in got:
      ours = got[method]["step_s"] / got[plain]["step_s"]
      body.append([f"{method} / {plain} step time", f"**{ours:.2f}x**", "", "",
                   f"{PAPER['ratio']}x (stated; {theirs_implied:.2f}x from their s / step)"])
  if "cmc" in got:
    body.append(["(cmc, 3 views, InfoNCE)", _s(got["cmc"]["step_s"]),
                 f"{got['cmc']['images_per_s']:.2f}",
                 f"{got['cmc']['peak_rss_mib'] / 1024:.2f}"])
  return table_lines(head, body)


def _scaling_table(rows) -> list:
  head = ["step", "encoder", "global batch", "devices", "simulated", "s / step", "images / s",
          "efficiency", "cores used", "compile s", "peak RSS MiB"]
  body = []
  base = {}
  for s, r in rows:
    if "error" not in r and s.num_devices == 1:
      base[s.method] = r["images_per_s"]
  for s, r in rows:
    if "error" in r:
      body.append([s.method, s.encoder, s.batch, s.num_devices, "",
                   f"error: {r['error'][:200]}"])
      continue
    eff = r["images_per_s"] / base[s.method] / s.num_devices if s.method in base else None
    body.append([
        s.label, s.encoder, str(s.batch), str(s.num_devices), "yes" if s.simulated else "no",
        _s(r["step_s"]), _f(r["images_per_s"], ".1f"), _f(eff, ".2f"),
        _f(r.get("cores_used"), ".2f"), _f(r["lower_s"] + r["compile_s"], ".1f"),
        _f(r["peak_rss_mib"], ".0f")])
  return table_lines(head, body)


def _parts_table(rows) -> list:
  head = ["encoder", "batch", "part", "s / call", "share of full step", "GFLOP", "XLA temp MiB",
          "cores used", "compile s"]
  body = []
  for s, r in rows:
    if "error" in r:
      body.append([s.encoder, s.batch, f"error: {r['error'][:200]}"])
      continue
    full = r["parts"]["full_step"]["step_s"]
    for name in ("views", "phase_a", "phase_b", "full_step"):
      p = r["parts"][name]
      body.append([
          s.encoder, str(s.batch), name, _s(p["step_s"]), f"{p['step_s'] / full:.0%}",
          _f(p.get("gflops"), ".1f"), _f(p.get("temp_mib"), ".0f"),
          _f(p.get("cores_used"), ".2f"), _f(p["compile_s"], ".1f")])
  return table_lines(head, body)


def render_markdown(results: dict, meta: dict) -> str:
  """The whole report: command, machine, then one table per measured section."""
  rows = [(Setting.from_json(v["setting"]), v["result"]) for v in results.values()]
  pick = lambda *kinds: [(s, r) for s, r in rows if s.kind in kinds]
  on_cpu = meta["platform"]["platform"] == "cpu"
  out = [f"# Step-time benchmark ({meta['platform']['platform']}, "
         f"{meta['platform']['kind']})", "",
         "Command (one run; every setting in its own subprocess):", "",
         f"```\n{meta['command']}\n```", "",
         f"jax {meta['platform']['jax']}, {meta['cpus']} CPU cores, python "
         f"{meta.get('python', platform.python_version())}; started {meta['started']}, took "
         f"{meta.get('wall_min', 0):.0f} min." + (f" {meta['note']}" if meta.get("note") else ""),
         "",
         "Machine load (the CPU is shared; timings are only as steady as this):", ""]
  for when in ("load_start", "load_end"):
    load = meta.get(when)
    if load:
      out.append(f"* {when.replace('_', ' ')}: load average {' '.join(load['loadavg'] or [])}")
      out.extend(f"  * {p}" for p in load["busy_processes"])
  out += ["", "Synthetic uint8 images (no download): 1437 8x8 grey for digits_conv (views: 2 "
          "augmented copies at 16x16), 5000 32x32 RGB otherwise (views: L, ab, Lab; "
          "upsampled to 224 for alexnet_half); bank of one row per image. `s / step` is the "
          "median over the timed steps after warm-up (each `block_until_ready`); compile = "
          "lower + compile of the pmapped step. XLA temp/args = `memory_analysis()` of the "
          "compiled step. Peak RSS = `ru_maxrss` of the setting's own process, which includes "
          "the jax runtime, the data and compilation; (+N) = that peak minus the RSS just "
          "before the step was compiled (state and data in memory, freed host memory "
          "released as the training loop does), i.e. what compiling and running the step "
          "added. Device peak is n/a on CPU (no `memory_stats()`). "
          "`cores used` = the worker's CPU time / wall time over the timed steps: how many of "
          f"the {meta['cpus']} cores the step actually got while sharing the machine. GFLOP = "
          "XLA's `cost_analysis()` of the compiled step"
          + ("." if on_cpu else
             "; on GPU it counts far fewer FLOP than XLA:CPU does for the same step (16 "
             "against 287 GFLOP for the paper's cmc step), so it leaves work out there: GFLOP "
             "and GFLOP/s on this device are not comparable with the CPU tables."), ""]
  steps_rows = pick("steps", "anchor")
  if steps_rows:
    out += ["## Step time and memory", "", *_steps_table(steps_rows), "",
            "## MetAug cost relative to the plain contrastive step", "",
            "Same encoder, batch, views, bank and data; `cmc` is the plain 3-view (digits: "
            "2-view) InfoNCE step with memory banks. `metaug` is the paper-ordered step (our "
            "default; virtual step from the updated encoder), `fused` takes the virtual step "
            "from the current encoder (`metaug.virtual_step_from=current`: Phase A's gradient "
            "is the inner one), `double-backward` is `metaug` with "
            "`metaug.meta_gradient=reverse`.", "", *_ratio_table(steps_rows), ""]
  anchor = pick("anchor")
  if anchor:
    n = {s.method: s.steps for s, _ in anchor}
    overrides = sorted({f"{k}={v}" for s, _ in anchor for k, v in s.overrides})
    out += ["## PAPER ANCHOR", "",
            f"Three AlexNet-half encoders (L, ab, Lab) at 224x224, batch "
            f"{ANCHOR['batch']}, K={ANCHOR['negatives']} negatives, bank N="
            f"{ANCHOR['bank_rows']} rows (5000 synthetic 32x32x3 images upsampled to 224 by "
            f"the views), `metaug.algorithm=paper`, 1 device"
            + (f", with {', '.join(f'`{o}`' for o in overrides)}" if overrides else "")
            + f". Measured with 1 warm-up step and {max(n.values())} timed steps"
            + (" only (minutes per step on this CPU)" if on_cpu else "")
            + ". The authors' numbers are their PyTorch code on a 2-core CPU machine; ratios "
            "> 1 mean ours is faster (images/s) or uses more memory (RSS)."
            + ("" if on_cpu else
               f" Here ours ran on {meta['platform']['kind']}, so the 'ours / authors' "
               "columns compare hardware as much as code: the like-for-like comparison is "
               "`experiments/results/benchmark_cpu.md`. The step-time ratios (MetAug / OUCL) "
               "compare like with like on any device."), "",
            *_anchor_table(anchor), ""]
  scaling = pick("scaling")
  if scaling:
    sim = any(s.simulated for s, _ in scaling)
    caption = ("Simulated CPU devices (`--xla_force_host_platform_device_count=N`, "
               f"`num_devices=N`) share the same {meta['cpus']} cores, so this measures the "
               "overhead of splitting the batch and of the cross-device collectives, not a "
               "speed-up; efficiency = (images/s at N) / (images/s at 1) / N, so ideal "
               "sharing of fixed cores would give 1/N.") if sim else \
        "Real devices; efficiency = (images/s at N) / (images/s at 1) / N (1.0 = linear)."
    out += ["## Scaling: one global batch over N devices", "", caption, "",
            *_scaling_table(scaling), ""]
  by_method = pick("methods")
  if by_method:
    out += ["## Every method's step", "",
            "Each registered method with its config variant (`configs/digits.py:NAME`; on the "
            "32x32 AlexNet `configs/cifar10.py:small,NAME`): cmc, the MetAug steps and the "
            "baselines. The Siamese baselines (moco, byol, simsiam, barlow_twins) and simclr "
            "contrast two views through one shared encoder, cmc and MetAug one encoder per "
            "view (3 Lab views on the AlexNet), so the ratios to `cmc` compare whole methods "
            "as a user would run them, not equal networks. `vs plain`: a hierarchical "
            "augmentation row's step time over its plain baseline's (simsiam_hai / simsiam, "
            "byol_hai / byol, barlow_hai / barlow_twins; docs/hierarchical_augmentation.md "
            "§7): on digits_conv the *_hai rows run the multi-exit digits net "
            "(`configs/digits.py:NAME`), on resnet18 both rows the same CIFAR ResNet-18 "
            "trunk at 32x32 (`configs/cifar10.py:small,NAME` with model.encoder=resnet18), "
            "the *_hai rows with their 2048-wide exit heads.", "",
            *_methods_table(by_method), ""]
  parts = pick("parts")
  if parts:
    out += ["## Where a MetAug step's time goes", "",
            "Each part compiled and timed alone on 1 device (median; parts include their own "
            "view augmentation, so they overlap by the `views` time). phase_a = gradient of "
            "L_total w.r.t. the encoders with the MAGs frozen (V+2 bank calls); phase_b = the "
            "MAG meta-gradient through the virtual encoder step in the paper's order (inner "
            "forward/backward, virtual forward/backward, then the second-order term: a "
            "forward-mode pass of the linearised encoder by default); full_step = "
            "the real step (adds optimiser and bank updates).", "",
            *_parts_table(parts), ""]
  return "\n".join(out)
