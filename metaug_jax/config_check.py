"""Validation of a config before anything compiles or touches the workdir.

Each problem becomes one line naming the field and the fix; `validate` raises ConfigError
with all of them, and the CLI prints them without a traceback.
"""

from metaug_jax import config_base


class ConfigError(ValueError):
  """An invalid config; the message lists every problem, one per line."""


def _choice(errors, name, value, allowed):
  if value not in allowed:
    errors.append(f"config.{name}={value!r} is not one of {', '.join(map(repr, allowed))}; "
                  f"pass --config.{name}=<one of these>.")


def validate(config, num_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError if the config cannot run on `num_devices` local devices."""
  e = []
  from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
  _choice(e, "method", config.method, registry.names())
  if config.method in registry.names() and registry.get(config.method).check:
    e.extend(registry.get(config.method).check(config))
  _choice(e, "loss.negatives", config.loss.negatives, config_base.NEGATIVES)
  if not 0.0 <= config.loss.tau_plus < 1.0:
    e.append(f"config.loss.tau_plus={config.loss.tau_plus} must be in [0, 1).")
  if not config.loss.hard_beta >= 0.0:
    e.append(f"config.loss.hard_beta={config.loss.hard_beta} must be >= 0.")
  for name, (low, high, integer) in registry.section_ranges().items():
    section, field = name.split(".")
    value = config[section][field]
    if (integer and value != int(value)) or not (low is None or value >= low) \
        or not (high is None or value <= high):
      e.append(f"config.{name}={value} must be {'an integer ' if integer else ''}in "
               f"[{low}, {'inf' if high is None else high}].")
  _choice(e, "dataset", config.dataset, config_base.DATASETS)
  _choice(e, "data.views", config.data.views, config_base.VIEW_KINDS)
  _choice(e, "model.encoder", config.model.encoder, config_base.ENCODERS)
  _choice(e, "model.dtype", config.model.dtype, ("float32", "bfloat16"))
  _choice(e, "model.matmul_precision", config.model.matmul_precision,
          config_base.MATMUL_PRECISIONS)
  _choice(e, "model.conv1_weight_grad", config.model.conv1_weight_grad,
          config_base.CONV1_WEIGHT_GRADS)
  _choice(e, "xla_cpu_scheduler", config.xla_cpu_scheduler, config_base.XLA_CPU_SCHEDULERS)
  _choice(e, "xla_cpu_conv_library", config.xla_cpu_conv_library,
          config_base.XLA_CPU_CONV_LIBRARIES)
  _choice(e, "bank.schedule", config.bank.schedule, ("clean", "code_exact"))
  _choice(e, "metaug.algorithm", config.metaug.algorithm, ("paper", "legacy"))
  _choice(e, "metaug.virtual_step_from", config.metaug.virtual_step_from,
          ("updated", "current"))
  _choice(e, "metaug.meta_gradient", config.metaug.meta_gradient,
          ("reverse", "forward_over_reverse"))
  _choice(e, "metaug.margin_type", config.metaug.margin_type, ("large", "medium", "small"))
  _choice(e, "loss.oucl_form", config.loss.oucl_form, (1, 2, 3))
  _choice(e, "loss.oucl_scale", config.loss.oucl_scale, ("code", "paper"))
  shards = num_devices * process_count
  if config.batch_size <= 0 or config.batch_size % shards:
    e.append(f"config.batch_size={config.batch_size} must be a positive multiple of the "
             f"{shards} devices it is split over; pass e.g. --config.batch_size="
             f"{max(shards, (max(config.batch_size, 1) // shards) * shards)} "
             f"or --config.num_devices=N.")
  for name in ("optim.lr", "optim.weight_decay", "optim.momentum", "metaug.mag_lr",
               "metaug.inner_lr", "metaug.lambda_aug", "metaug.lambda_mi", "eval.probe_lr",
               "loss.temperature", "loss.oucl_beta", "bank.momentum"):
    value = config
    for part in name.split("."):
      value = value[part]
    if value < 0:
      e.append(f"config.{name}={value} is negative; it must be >= 0.")
  if config.loss.temperature == 0 or config.loss.oucl_beta == 0:
    e.append("config.loss.temperature and config.loss.oucl_beta must be > 0.")
  if config.num_epochs <= 0 and config.num_train_steps <= 0:
    e.append("set config.num_epochs or config.num_train_steps to a positive number.")
  if config.data.num_views < 2 and config.data.views in ("augmented_copies", "simclr"):
    e.append(f"config.data.num_views={config.data.num_views}: contrastive learning needs >= 2.")
  if config.method == "simclr" and config.data.views in ("lab", "lab2") \
      and config.model.share_encoder:
    e.append("lab views have different channel counts; use --config.model.share_encoder=False.")
  if config.model.encoder == "alexnet_half" and config.data.input_size != 224:
    e.append(f"model.encoder='alexnet_half' needs 224x224 inputs (its fc6 expects a 6x6 conv5 "
             f"map), got data.input_size={config.data.input_size}; use "
             f"--config.data.input_size=224 or --config.model.encoder=alexnet_small.")
  if config.dataset in ("tiny_imagenet", "cifar_archive", "folder", "npz") \
      and not config.data_dir:
    e.append(f"config.dataset={config.dataset!r} reads local files: pass "
             f"--config.data_dir=PATH.")
  if config.eval.knn_k < 1 or config.eval.knn_temperature <= 0:
    e.append(f"config.eval.knn_k={config.eval.knn_k} must be >= 1 and "
             f"config.eval.knn_temperature={config.eval.knn_temperature} > 0.")
  if config.bank.num_negatives <= 0:
    e.append("config.bank.num_negatives must be positive.")
  if config.checkpoint_every_steps <= 0 or config.keep_checkpoints <= 0:
    e.append("config.checkpoint_every_steps and config.keep_checkpoints must be positive.")
  if e:
    raise ConfigError("\n".join(e))
