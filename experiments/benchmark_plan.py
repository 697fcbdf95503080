"""Which settings the benchmark measures: the encoders, batches, named steps and sections.

A `Setting` is one measurement (step x encoder x batch x devices); `plan` lists them in the
order `experiments/benchmark.py` runs them (see its docstring for the sections).
"""

import dataclasses
import json

ENCODERS = ("digits_conv", "alexnet_small", "resnet18", "alexnet_half")
DEFAULT_BATCHES = {"digits_conv": (64, 128, 256), "alexnet_small": (32, 64),
                   "resnet18": (32,), "alexnet_half": (64,)}
PLAIN_METHODS = {"digits_conv": ("simclr", "cmc")}  # others: ("cmc",)
# Named steps that are a method plus config overrides. "metaug" itself is the default,
# paper-ordered step (docs/metaug.md §5.1) with the forward-over-reverse meta-gradient.
STEP_VARIANTS = {
    # The virtual step starts from the current theta, so Phase A's gradient is the inner one.
    "metaug_fused": ("metaug", (("metaug.virtual_step_from", "current"),)),
    # The meta-gradient as jax.grad of jax.grad (double backward), the earlier default.
    "metaug_double_backward": ("metaug", (("metaug.meta_gradient", "reverse"),)),
    # The fused step with rematerialised conv blocks (memory for compute).
    "metaug_fused_remat": ("metaug", (("metaug.virtual_step_from", "current"),
                                      ("model.remat", True))),
    # The leanest steps: rematerialised blocks and XLA:CPU's memory-minimising scheduler.
    "metaug_lean": ("metaug", (("model.remat", True), ("xla_cpu_scheduler", "memory"))),
    "metaug_fused_lean": ("metaug", (("metaug.virtual_step_from", "current"),
                                     ("model.remat", True), ("xla_cpu_scheduler", "memory"))),
    # ... and without XLA's CSE pass, which on CPU merges the recomputation into the forward.
    "metaug_fused_lean_nocse": ("metaug", (("metaug.virtual_step_from", "current"),
                                           ("model.remat", True),
                                           ("xla_cpu_scheduler", "memory"), ("xla_cse", False))),
}
# The same steps with XLA:CPU's convolutions where the jaxlib puts them (YNNPACK in jaxlib
# 0.10-0.11) instead of on Eigen's kernels (config.xla_cpu_conv_library, our default "eigen").
_DEFAULT_CONVS = ("xla_cpu_conv_library", "xla_default")
STEP_VARIANTS.update({
    "cmc_ynnpack": ("cmc", (_DEFAULT_CONVS,)),
    "metaug_oucl_only_ynnpack": ("metaug_oucl_only", (_DEFAULT_CONVS,)),
    "metaug_ynnpack": ("metaug", (_DEFAULT_CONVS,)),
    "metaug_fused_ynnpack": ("metaug", (("metaug.virtual_step_from", "current"),
                                        _DEFAULT_CONVS)),
})
STEP_METHODS = ("metaug_oucl_only", "metaug", "metaug_fused", "metaug_double_backward")
YNNPACK_STEP_METHODS = ("cmc_ynnpack", "metaug_fused_ynnpack")
ANCHOR_EXTRA_METHODS = ("metaug_fused_remat", "metaug_lean", "metaug_fused_lean",
                        "metaug_fused_lean_nocse", "metaug_oucl_only_ynnpack", "metaug_ynnpack",
                        "metaug_fused_ynnpack", "cmc_ynnpack")
ANCHOR = {"encoder": "alexnet_half", "batch": 64, "negatives": 1024, "bank_rows": 5000}
METHODS_SETTINGS = (("digits_conv", 128), ("alexnet_small", 64))  # the methods section
# Hierarchical augmentation invariance (docs/hierarchical_augmentation.md): each method's row
# follows its plain baseline's, and the report gives their step-time ratio. Its multi-exit
# backbones exist for the digits net and ResNet-18 (no AlexNet), so the pairs also run on
# resnet18, where the two share the trunk.
HAI_BASELINES = {"simsiam_hai": "simsiam", "byol_hai": "byol", "barlow_hai": "barlow_twins"}
HAI_ENCODERS = ("digits_conv", "resnet18")
HAI_SETTINGS = (("resnet18", 32),)    # pairs only (besides their rows in METHODS_SETTINGS)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One measurement: which step, on which encoder, batch and number of devices."""
  kind: str              # steps | anchor | scaling | parts
  encoder: str
  method: str
  batch: int
  num_devices: int = 1
  simulated: bool = False  # simulated CPU devices (XLA_FLAGS) rather than real ones
  warmup: int = 1
  steps: int = 5
  overrides: tuple = ()    # (("metaug.first_order", True), ...) applied to the config

  @property
  def key(self) -> str:
    """Unique per measurement, overrides included (so --resume never mixes two configs)."""
    base = f"{self.kind}:{self.encoder}:{self.method}:b{self.batch}:d{self.num_devices}"
    return base + "".join(f":{k}={v}" for k, v in self.overrides)

  @property
  def label(self) -> str:
    """The step's name in the tables: the method, with any config overrides."""
    return self.method + overrides_suffix(self.overrides)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "Setting":
    d = json.loads(text)
    d["overrides"] = tuple(tuple(o) for o in d.get("overrides", ()))
    return cls(**d)


def overrides_suffix(overrides) -> str:
  """' [key=value]' per config override, for table labels."""
  return "".join(f" [{k}={v}]" for k, v in overrides)


def plain_methods(encoder: str) -> tuple:
  return PLAIN_METHODS.get(encoder, ("cmc",))


def hai_of(baseline: str) -> str:
  """The hierarchical-augmentation method built on `baseline`."""
  return next(m for m, b in HAI_BASELINES.items() if b == baseline)


def methods_rows(names: tuple, encoder: str) -> tuple:
  """The methods section's rows on `encoder`: `names` in order, each *_hai method moved
  right after its plain baseline, and left out where it has no multi-exit backbone."""
  out = []
  for name in names:
    if name in HAI_BASELINES:
      continue
    out.append(name)
    if name in HAI_BASELINES.values() and encoder in HAI_ENCODERS:
      out.append(hai_of(name))
  return tuple(out)


def plan(sections, encoders, batches, steps: int, warmup: int, anchor_steps: int,
         scaling_devices, scaling_encoder: str, scaling_batch: int, scaling_methods,
         accelerator_count: int, overrides: tuple = ()) -> list:
  """The list of settings to measure, in the order they run."""
  todo = []
  if "steps" in sections:
    for encoder in encoders:
      if encoder == ANCHOR["encoder"]:
        continue  # measured once, by the anchor section
      for batch in batches.get(encoder, DEFAULT_BATCHES[encoder]):
        for method in plain_methods(encoder) + STEP_METHODS + YNNPACK_STEP_METHODS:
          todo.append(Setting("steps", encoder, method, batch, warmup=warmup, steps=steps,
                              overrides=overrides))
  if "anchor" in sections or ("steps" in sections and ANCHOR["encoder"] in encoders):
    for method in ("cmc",) + STEP_METHODS + ANCHOR_EXTRA_METHODS:
      todo.append(Setting("anchor", ANCHOR["encoder"], method, ANCHOR["batch"],
                          warmup=1, steps=anchor_steps, overrides=overrides))
  if "scaling" in sections:
    simulated = accelerator_count <= 1
    counts = scaling_devices if simulated else \
        [n for n in (1, 2, 4, 8, 16) if n <= accelerator_count]
    for method in scaling_methods:
      for n in counts:
        todo.append(Setting("scaling", scaling_encoder, method, scaling_batch, num_devices=n,
                            simulated=simulated, warmup=warmup, steps=steps,
                            overrides=overrides))
  if "methods" in sections:
    from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
    every = ("cmc",) + tuple(m for m in registry.names() if m != "cmc")
    pairs = tuple(m for base in HAI_BASELINES.values() for m in (base, hai_of(base)))
    for encoder, batch in METHODS_SETTINGS + HAI_SETTINGS:
      if encoder in encoders:
        names = pairs if (encoder, batch) in HAI_SETTINGS else methods_rows(every, encoder)
        for method in names:
          todo.append(Setting("methods", encoder, method, batch, warmup=warmup, steps=steps,
                              overrides=overrides))
  if "parts" in sections:
    for encoder in encoders:
      batch = ANCHOR["batch"] if encoder == ANCHOR["encoder"] else \
          max(batches.get(encoder, DEFAULT_BATCHES[encoder]))
      is_anchor = encoder == ANCHOR["encoder"]
      todo.append(Setting("parts", encoder, "metaug", batch, warmup=1,
                          steps=anchor_steps if is_anchor else steps, overrides=overrides))
  return todo
