"""Validation of a config before anything compiles or touches the workdir.

Each problem becomes one line naming the field and the fix; `validate` raises ConfigError
with all of them, and the CLI prints them without a traceback. `FIELDS` is the one table of
what every number and every choice of the base config may hold; the checks after it relate
fields to each other, to the devices, and (`validate_data`) to the loaded data set.
"""

import dataclasses
import math
from typing import Optional, Union

from metaug_jax import config_base
from metaug_jax.data import loader


class ConfigError(ValueError):
  """An invalid config; the message lists every problem, one per line."""


def _number(x: float) -> str:
  """A bound as written: 4294967295, 0.5, 2.5."""
  return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
  """Finite numbers from lo to hi (None: unbounded; an open end is excluded).

  `shape` is "scalar", "pair" (a (lo, hi) tuple, lo <= hi, both in range) or "tuple" (any
  number of values, each in range). `integer` also asks for whole numbers.
  """
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  shape: str = "scalar"

  def holds(self, x) -> bool:
    """Whether one number x lies in the range."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
      return False
    if self.integer and not float(x).is_integer():
      return False
    if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
      return False
    return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

  def accepts(self, value) -> bool:
    """Whether a field value (a number, or a tuple for pair / tuple shapes) is allowed."""
    if self.shape == "scalar":
      return self.holds(value)
    if not isinstance(value, (tuple, list)) or not all(self.holds(v) for v in value):
      return False
    return self.shape == "tuple" or (len(value) == 2 and value[0] <= value[1])

  def describe(self) -> str:
    """The range in words: 'an integer >= 1', 'a finite number in (0, 1]', ..."""
    if self.lo is not None and self.hi is not None:
      bounds = (f" in {'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}"
                f"{')' if self.hi_open else ']'}")
    elif self.lo is not None:
      bounds = f" {'>' if self.lo_open else '>='} {_number(self.lo)}"
    else:
      bounds = "" if self.hi is None else f" {'<' if self.hi_open else '<='} {_number(self.hi)}"
    noun = "integer" if self.integer else "number"
    if self.shape == "pair":
      return f"a pair (lo, hi) of {noun}s{bounds} with lo <= hi"
    if self.shape == "tuple":
      return f"a tuple of {noun}s{bounds}"
    return f"{'an integer' if self.integer else 'a finite number'}{bounds}"


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of a fixed set of values (`many`: a tuple of them, possibly empty)."""
  options: tuple
  many: bool = False

  def accepts(self, value) -> bool:
    one = lambda v: v in self.options and not isinstance(v, bool)
    if self.many:
      return isinstance(value, (tuple, list)) and all(one(v) for v in value)
    return one(value)


def _int(lo: int = 0, hi: Optional[int] = None) -> Range:
  """Integers from lo to hi (None: unbounded)."""
  return Range(lo, hi, integer=True)


NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
PROBABILITY = Range(0, 1)
MOMENTUM = Range(0, 1, hi_open=True)
SEED = _int(0, 2 ** 32 - 1)          # numpy and scikit-learn seeds are 32-bit

# Every number and every choice of config_base.get_base_config(), in its order, but for the
# method name and the methods' own sections, which `all_fields` adds from the method registry.
# Strings that are free text (paths) are FREE_TEXT; booleans need no entry.
# tests/test_config_check.py fails if a numeric or string field lacks one.
FIELDS: dict[str, Union[Range, Choice]] = {
    "seed": SEED,
    "num_devices": _int(0),
    "dataset": Choice(config_base.DATASETS),
    "data.views": Choice(config_base.VIEW_KINDS),
    "data.num_views": _int(1),
    "data.input_size": _int(1),
    "data.crop_scale": Range(0, 1, lo_open=True, shape="pair"),
    "data.crop_ratio": Range(0, lo_open=True, shape="pair"),
    "data.max_rotation_deg": Range(0, 180),
    "data.max_translate": Range(0, 1),
    "data.noise_std": NON_NEGATIVE,
    "data.jitter_strength": Range(0, 2.5),   # its hue jitter, 0.2 x strength, is <= half a turn
    "data.grey_probability": PROBABILITY,
    "data.test_fraction": Range(0, 1, hi_open=True),
    "data.split_seed": SEED,
    "data.max_train_examples": _int(0),
    "data.folder_image_size": _int(0),
    "data.stl10_pretrain_split": Choice(("train+unlabelled", "train")),
    "data.prefetch": _int(1),
    "data.order": Choice(loader.ORDERS),
    "model.encoder": Choice(config_base.ENCODERS),
    "model.embedding_dim": _int(1),
    "model.width": POSITIVE,
    "model.mag_hidden": _int(1),
    "model.dtype": Choice(("float32", "bfloat16")),
    "model.matmul_precision": Choice(config_base.MATMUL_PRECISIONS),
    "model.conv1_weight_grad": Choice(config_base.CONV1_WEIGHT_GRADS),
    "xla_cpu_scheduler": Choice(config_base.XLA_CPU_SCHEDULERS),
    "xla_cpu_conv_library": Choice(config_base.XLA_CPU_CONV_LIBRARIES),
    "batch_size": _int(1),
    "num_epochs": _int(0),
    "num_train_steps": _int(0),
    "optim.lr": NON_NEGATIVE,
    "optim.momentum": MOMENTUM,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.lr_decay_epochs": Range(0, integer=True, shape="tuple"),
    "optim.lr_decay_rate": Range(0, 1, lo_open=True),
    "loss.temperature": POSITIVE,
    "loss.oucl_form": Choice((1, 2, 3)),
    "loss.oucl_beta": POSITIVE,
    "loss.oucl_gamma_pos": Range(-1, 1),     # margins on cosine similarities
    "loss.oucl_gamma_neg": Range(-1, 1),
    "loss.oucl_margin": NON_NEGATIVE,
    "loss.oucl_scale": Choice(("code", "paper")),
    "loss.negatives": Choice(config_base.NEGATIVES),
    "loss.tau_plus": Range(0, 1, hi_open=True),
    "loss.hard_beta": NON_NEGATIVE,
    "bank.num_negatives": _int(1),
    "bank.momentum": PROBABILITY,
    "bank.schedule": Choice(("clean", "code_exact")),
    "bank.init": Choice(config_base.BANK_INITS),
    "metaug.algorithm": Choice(("paper", "legacy")),
    "metaug.inner_lr": NON_NEGATIVE,
    "metaug.virtual_step_from": Choice(("updated", "current")),
    "metaug.meta_gradient": Choice(("reverse", "forward_over_reverse")),
    "metaug.lambda_aug": NON_NEGATIVE,
    "metaug.lambda_mi": NON_NEGATIVE,
    "metaug.margin_type": Choice(("large", "medium", "small")),
    "metaug.margin_pos_scale": NON_NEGATIVE,
    "metaug.mag_lr": NON_NEGATIVE,
    "metaug.mag_momentum": MOMENTUM,
    "metaug.mag_weight_decay": NON_NEGATIVE,
    "log_every_steps": _int(1),
    "checkpoint_every_steps": _int(1),
    "keep_checkpoints": _int(1),
    "debug_kill_at_step": _int(0),
    "eval.probe_epochs": _int(1),
    "eval.probe_lr": NON_NEGATIVE,
    "eval.probe_batch_size": _int(1),
    "eval.probe_weight_decay": NON_NEGATIVE,
    "eval.batch_size": _int(1),
    "eval.step": _int(0),
    "eval.knn_k": _int(1),
    "eval.knn_temperature": POSITIVE,
    "eval.few_label_fractions": Range(0, 1, lo_open=True, shape="tuple"),
    "eval.few_label_draws": _int(1),
    "eval.val_fraction": Range(0, 1, hi_open=True),
    "eval.val_lrs": Range(0, lo_open=True, shape="tuple"),
    "eval.val_weight_decays": Range(0, shape="tuple"),
    "eval.knn_levels": Choice(("conv", "fc", "mag_hidden", "embedding"), many=True),
    "eval.monitor_every_steps": _int(0),
    "eval.monitor_examples": _int(2),        # score histograms need a negative pair
    "eval.tsne_max_points": _int(0),
    "eval.colour_probe_examples": _int(0),
}
FREE_TEXT = ("data_dir", "data.test_file")


def all_fields() -> dict:
  """FIELDS with the entries the registered methods bring: `method` itself and the fields
  of every method's own config section (metaug_jax/methods/registry.py)."""
  # pylint: disable-next=g-import-not-at-top (methods -> models -> xla_runtime -> this module)
  from metaug_jax.methods import registry
  return {"method": Choice(registry.names()), **FIELDS, **registry.section_ranges()}


def get_field(config, name: str):
  """The value of a dotted field name, e.g. get_field(config, 'optim.lr')."""
  value = config
  for part in name.split("."):
    value = value[part]
  return value


def _flag_value(value) -> str:
  """`value` as it is written after --config.NAME= ((0.3,1.0), 0.03, 'x')."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(map(repr, value)) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def _field_problem(name: str, value, rule: Union[Range, Choice]) -> Optional[str]:
  """The line for one field outside its FIELDS entry, or None."""
  if isinstance(rule, Choice):
    if rule.accepts(value):
      return None
    if rule.many:
      return (f"config.{name}={_flag_value(value)} must be a tuple of values from "
              f"{', '.join(map(repr, rule.options))}; pass e.g. --config.{name}="
              f"{_flag_value(get_field(config_base.get_base_config(), name))}.")
    return (f"config.{name}={value!r} is not one of {', '.join(map(repr, rule.options))}; "
            f"pass --config.{name}=<one of these>.")
  if rule.accepts(value):
    return None
  fix = get_field(config_base.get_base_config(), name)
  if rule.shape == "pair" and isinstance(value, tuple) and rule.accepts(tuple(value[::-1])):
    fix = tuple(value[::-1])
  return (f"config.{name}={_flag_value(value)} must be {rule.describe()}; pass e.g. "
          f"--config.{name}={_flag_value(fix)}.")


def field_problems(config) -> dict:
  """{field name: its line} for the fields of `config` that break their `all_fields` entry."""
  problems = {}
  for name, rule in all_fields().items():
    problem = _field_problem(name, get_field(config, name), rule)
    if problem:
      problems[name] = problem
  return problems


def input_size_problem(encoder: str, size: int) -> Optional[str]:
  """The line for an encoder that cannot take size x size inputs, naming the sizes that work."""
  # pylint: disable-next=g-import-not-at-top (encoders -> xla_runtime -> this module)
  from metaug_jax.models import encoders
  if encoders.accepts_input_size(encoder, size):
    return None
  fits = next((s for s in range(size, size + 1025) if encoders.accepts_input_size(encoder, s)),
              encoders.smallest_input_size(encoder))
  others = [e for e in config_base.ENCODERS if encoders.accepts_input_size(e, size)]
  other = (f", or an encoder that takes {size}: --config.model.encoder="
           f"{' or '.join(others)}" if others else "")
  return (f"config.model.encoder={encoder!r} takes data.input_size "
          f"{encoders.input_sizes_text(encoder)}, got data.input_size={size}; pass "
          f"--config.data.input_size={fits}{other}.")


def validate(config, num_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError if the config cannot run on `num_devices` local devices."""
  bad = field_problems(config)
  e = list(bad.values())
  ok = lambda *names: not any(n in bad for n in names)
  from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
  spec = registry.specs().get(config.method)
  if spec is not None and spec.check is not None and ok("data.views", "data.num_views"):
    e.extend(spec.check(config))
  shards = num_devices * process_count
  if ok("batch_size") and config.batch_size % shards:
    e.append(f"config.batch_size={config.batch_size} must be a positive multiple of the "
             f"{shards} devices it is split over; pass e.g. --config.batch_size="
             f"{max(shards, (config.batch_size // shards) * shards)} "
             f"or --config.num_devices=N.")
  if ok("num_epochs", "num_train_steps") and config.num_epochs <= 0 \
      and config.num_train_steps <= 0:
    e.append("set config.num_epochs or config.num_train_steps to a positive number.")
  if ok("data.num_views", "data.views") and config.data.num_views < 2 \
      and config.data.views in ("augmented_copies", "simclr"):
    e.append(f"config.data.num_views={config.data.num_views}: contrastive learning needs >= 2.")
  if config.method == "simclr" and config.data.views in ("lab", "lab2") \
      and config.model.share_encoder:
    e.append("lab views have different channel counts; use --config.model.share_encoder=False.")
  if ok("model.encoder", "data.input_size"):
    problem = input_size_problem(config.model.encoder, config.data.input_size)
    if problem:
      e.append(problem)
  if config.dataset in ("tiny_imagenet", "cifar_archive", "folder", "npz", "idx") \
      and not config.data_dir:
    e.append(f"config.dataset={config.dataset!r} reads local files: pass "
             f"--config.data_dir=PATH.")
  if e:
    raise ConfigError("\n".join(e))


def validate_data(config, dataset, num_shards: int) -> None:
  """Raises ConfigError if the config does not fit the loaded data set (before any compile)."""
  e = []
  n = int(dataset.pretrain_images.shape[0])
  if config.batch_size > n:
    fits = (n // num_shards) * num_shards
    fix = (f"pass --config.batch_size={fits} or less" if fits else
           f"there are fewer examples than the {num_shards} devices: pass "
           f"--config.num_devices={n} and --config.batch_size={n}")
    e.append(f"config.batch_size={config.batch_size} exceeds the {n} pre-training examples of "
             f"{dataset.name}, so an epoch has no full batch; {fix}.")
  if config.data.views in ("lab", "lab2") and dataset.channels != 3:
    e.append(f"config.data.views={config.data.views!r} needs colour (RGB) images, but "
             f"{dataset.name} has {dataset.channels} channel; pass "
             f"--config.data.views=augmented_copies for grey data.")
  if e:
    raise ConfigError("\n".join(e))


def validate_probe_data(config, dataset) -> None:
  """Raises ConfigError before training if the probe after it would find no labelled test set."""
  if config.eval.probe_after_training and not dataset.has_test_set:
    why = ("has no labels" if not dataset.has_labels else
           "has no test set (data.test_fraction=0 and no data.test_file)")
    raise ConfigError(
        f"{dataset.name} {why}, so the linear probe after training cannot run; pass "
        f"--config.eval.probe_after_training=False to only pre-train, or give the data "
        f"labels and a test split.")


def decay_warning(config, total_steps: int, steps_per_epoch: int) -> Optional[str]:
  """A warning line if some optim.lr_decay_epochs fall at or after the run's last step.

  The decay epochs are absolute, so a run shortened by num_epochs or num_train_steps never
  reaches them and its learning rate silently stays high. The suggested epochs keep the
  decays' fractions of config.num_epochs (or of the last decay, if later) within this run.
  """
  epochs = tuple(int(e) for e in config.optim.lr_decay_epochs)
  beyond = [e for e in epochs if e * steps_per_epoch >= total_steps]
  if not beyond:
    return None
  run_epochs = total_steps / steps_per_epoch
  length = max(config.num_epochs, max(epochs) + 1)
  scaled = sorted({int(e * run_epochs / length) for e in epochs} - {0})
  scaled = [e for e in scaled if e * steps_per_epoch < total_steps]
  hint = (f"e.g. --config.optim.lr_decay_epochs={_flag_value(tuple(scaled))} (spaced as "
          f"configured, within this run)" if scaled else
          "--config.optim.lr_decay_epochs=() (no decay: the run is too short for whole-epoch "
          "decays)")
  return (f"warning: this run ends after {run_epochs:.3g} epochs ({total_steps} steps of "
          f"{steps_per_epoch} per epoch), before optim.lr_decay_epochs "
          f"{_flag_value(tuple(beyond))} (absolute epochs), so those learning-rate decays never "
          f"happen; pass {hint}.")
