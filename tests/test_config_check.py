"""Config validation: the FIELDS table covers every field, ranges refuse NaN/inf and out-of-range
values, encoders' input sizes, the data-dependent checks and the lr-decay warning."""

import importlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metaug_jax import config_base, config_check
from metaug_jax.config_check import ConfigError
from metaug_jax.data import sources
from metaug_jax.models import encoders
from metaug_jax.methods import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

CONFIG_VARIANTS = [("digits", ""), ("digits", "tiny"), ("digits", "simclr"), ("cifar10", ""),
                   ("cifar10", "small,cmc"), ("cifar100", "small"), ("stl10", ""),
                   ("tiny_imagenet", "small")]
# Every method's variant on the quick start and on a paper config (registry-driven).
CONFIG_VARIANTS += [(f, f"{m},{extra}".rstrip(",")) for m in registry.names()
                    for f, extra in (("digits", "tiny"), ("cifar10", ""), ("cifar10", "small"))]


def _leaves(config, prefix=""):
  """{dotted name: value} of every non-section field."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _is_numeric(value) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, (tuple, list)):
    return all(_is_numeric(v) for v in value)
  return isinstance(value, (int, float))


def _problems(**overrides):
  """The ConfigError lines of the base config with `overrides` (dotted names)."""
  c = config_base.get_base_config()
  c.update_from_flattened_dict(overrides)
  try:
    config_check.validate(c, 1)
  except ConfigError as e:
    return str(e).splitlines()
  return []


# ---- the table ---------------------------------------------------------------------------


def test_every_numeric_and_string_field_has_a_table_entry():
  fields = _leaves(config_base.get_base_config())
  missing = [n for n, v in fields.items()
             if (_is_numeric(v) or isinstance(v, str)) and n not in config_check.all_fields()
             and n not in config_check.FREE_TEXT]
  assert not missing, f"add these fields to config_check.FIELDS: {missing}"
  stale = [n for n in list(config_check.all_fields()) + list(config_check.FREE_TEXT)
           if n not in fields]
  assert not stale, f"config_check.FIELDS names fields the base config lacks: {stale}"


def test_every_default_and_config_file_passes_its_table():
  assert not config_check.field_problems(config_base.get_base_config())
  base = set(_leaves(config_base.get_base_config()))
  for name, variant in CONFIG_VARIANTS:
    c = importlib.import_module(name).get_config(variant)
    assert set(_leaves(c)) == base, (name, variant)   # config files add no fields
    c.data_dir = c.data_dir or "somewhere"
    config_check.validate(c, 1)


@pytest.mark.parametrize("name,value,needle", [
    ("optim.lr", math.nan, "config.optim.lr=nan must be a finite number >= 0"),
    ("optim.lr", math.inf, "config.optim.lr=inf must be a finite number >= 0"),
    ("optim.lr", -1.0, "config.optim.lr=-1.0"),
    ("optim.momentum", 1.0, "in [0, 1)"),
    ("log_every_steps", 0, "config.log_every_steps=0 must be an integer >= 1"),
    ("eval.probe_epochs", 0, "config.eval.probe_epochs=0 must be an integer >= 1"),
    ("data.prefetch", 0, "config.data.prefetch=0"),
    ("model.embedding_dim", 0, "config.model.embedding_dim=0"),
    ("keep_checkpoints", -1, "config.keep_checkpoints=-1"),
    ("data.crop_scale", (1.0, 0.5), "--config.data.crop_scale=(0.5,1.0)"),
    ("data.crop_scale", (0.0, 1.0), "(0, 1]"),
    ("data.crop_ratio", (0.75, math.nan), "config.data.crop_ratio"),
    ("optim.lr_decay_epochs", (10, 2.5), "a tuple of integers >= 0"),
    ("optim.lr_decay_epochs", (-1,), "a tuple of integers >= 0"),
    ("data.grey_probability", 1.5, "in [0, 1]"),
    ("data.test_fraction", 1.0, "in [0, 1)"),
    ("loss.temperature", 0.0, "> 0"),
    ("seed", -1, "in [0, 4294967295]"),
    ("loss.oucl_form", 4, "is not one of 1, 2, 3"),
    ("data.stl10_pretrain_split", "unlabelled", "'train+unlabelled', 'train'"),
])
def test_out_of_range_field_is_one_line_naming_it(name, value, needle):
  problems = _problems(**{name: value})
  assert len(problems) == 1 and needle in problems[0], problems
  assert f"--config.{name}=" in problems[0]                 # says how to set it


def test_range_edges_are_inclusive_or_exclusive_as_declared():
  assert config_check.Range(0, 1).accepts(0) and config_check.Range(0, 1).accepts(1)
  assert not config_check.Range(0, 1, lo_open=True).accepts(0)
  assert not config_check.Range(0, 1, hi_open=True).accepts(1)
  assert not config_check.Range(0).accepts(math.inf) and not config_check.Range().accepts(math.nan)
  assert not config_check.Range(0).accepts(True)
  assert config_check.Range(0, integer=True, shape="tuple").accepts(())
  assert not config_check.Range(0, 1, shape="pair").accepts((0.5,))


def test_two_bad_fields_give_two_lines():
  assert len(_problems(**{"optim.lr": math.nan, "log_every_steps": 0})) == 2


def test_cross_checks_skip_fields_already_out_of_range():
  problems = _problems(batch_size=0)
  assert len(problems) == 1 and "integer >= 1" in problems[0], problems


# ---- encoders and input sizes ------------------------------------------------------------


_LAST_CONV_BLOCK = {"digits_conv": "conv3", "resnet18": "stage4_block2",
                    "alexnet_small": "conv5", "alexnet_half": "conv5"}


def _init_conv_side(encoder: str, size: int) -> int:
  """Side of the last conv map of a real (abstract) initialisation at size x size, 1 channel."""
  mc = ml_collections.ConfigDict(dict(encoder=encoder, embedding_dim=8, width=0.125,
                                      dtype="float32", remat=False, conv1_weight_grad="xla"))
  module = encoders.build_encoder(mc)
  init = lambda x: module.init_with_output(jax.random.PRNGKey(0), x, train=True,
                                           capture_intermediates=True)
  _, variables = jax.eval_shape(init, jnp.zeros((2, size, size, 1)))
  (block_out,) = variables["intermediates"][_LAST_CONV_BLOCK[encoder]]["__call__"]
  return block_out.shape[1]


@pytest.mark.parametrize("encoder,smallest", [("digits_conv", 4), ("resnet18", 1),
                                              ("alexnet_small", 32), ("alexnet_half", 224)])
def test_smallest_accepted_size_inits_and_the_next_smaller_is_refused(encoder, smallest):
  assert encoders.smallest_input_size(encoder) == smallest
  _init_conv_side(encoder, smallest)                     # initialises
  problems = _problems(**{"model.encoder": encoder, "data.input_size": smallest})
  assert not problems, problems
  refused = _problems(**{"model.encoder": encoder, "data.input_size": smallest - 1})
  assert len(refused) == 1, refused
  if smallest > 1:                                       # input_size 0 is the range's line
    assert encoders.input_sizes_text(encoder) in refused[0]
    with pytest.raises(Exception):                       # and the module refuses it too
      _init_conv_side(encoder, smallest - 1)


@pytest.mark.parametrize("encoder,sizes", [("digits_conv", (5, 7, 8, 16, 28)),
                                           ("resnet18", (2, 7, 28, 32)),
                                           ("alexnet_small", (64, 96))])
def test_conv_map_arithmetic_matches_the_modules(encoder, sizes):
  for size in sizes:
    assert encoders.accepts_input_size(encoder, size)
    assert encoders.conv_map_side(encoder, size) == _init_conv_side(encoder, size), size


def test_alexnet_small_refusal_names_the_sizes_that_work():
  problems = _problems(**{"model.encoder": "alexnet_small", "data.input_size": 28})
  assert len(problems) == 1
  assert "multiple of 32" in problems[0] and "--config.data.input_size=32" in problems[0]
  assert "digits_conv or resnet18" in problems[0]
  assert not encoders.accepts_input_size("alexnet_small", 48)  # 48 // 32 = 1: a 6x6 map


# ---- data-dependent checks and the lr-decay warning --------------------------------------


def _dataset(n=100, channels=1, labels=True):
  x = np.zeros((n, 8, 8, channels), np.uint8)
  y = (np.arange(n) % 2).astype(np.int32) if labels else None
  return sources.ImageDataset("toy", x, x, y, x[:10] if labels else None,
                              y[:10] if labels else None, 2 if labels else None)


def test_batch_larger_than_the_data_set_is_refused_with_a_size_that_fits():
  c = config_base.get_base_config()
  c.batch_size = 256
  with pytest.raises(ConfigError, match=r"config.batch_size=256 exceeds the 98 pre-training "
                                        r"examples of toy.*--config.batch_size=96 or less"):
    config_check.validate_data(c, _dataset(98), num_shards=4)
  c.batch_size = 96
  config_check.validate_data(c, _dataset(98), num_shards=4)


def test_lab_views_of_grey_data_and_a_probe_without_labels_are_refused():
  c = config_base.get_base_config()
  c.data.views, c.batch_size = "lab", 64
  with pytest.raises(ConfigError, match="needs colour"):
    config_check.validate_data(c, _dataset(channels=1), num_shards=1)
  config_check.validate_data(c, _dataset(channels=3), num_shards=1)
  with pytest.raises(ConfigError, match="probe_after_training=False"):
    config_check.validate_probe_data(c, _dataset(labels=False))
  c.eval.probe_after_training = False
  config_check.validate_probe_data(c, _dataset(labels=False))


def test_decay_warning_names_the_unreached_epochs_and_a_fitting_setting():
  c = config_base.paper_config("cifar10")           # 300 epochs, decays (120, 160, 200)
  assert config_check.decay_warning(c, 300 * 50, 50) is None
  c.num_train_steps = 60 * 50
  warning = config_check.decay_warning(c, 60 * 50, 50)
  assert warning.startswith("warning: ") and "\n" not in warning
  assert "(120,160,200)" in warning and "--config.optim.lr_decay_epochs=(24,32,40)" in warning
  c.optim.lr_decay_epochs = (24, 32, 40)
  assert config_check.decay_warning(c, 60 * 50, 50) is None
  c.optim.lr_decay_epochs = (30, 60)                # decay at the last step: never applied
  assert "(60,)" in config_check.decay_warning(c, 60 * 50, 50)
  c.optim.lr_decay_epochs = (120,)                  # shorter than an epoch: no decay fits
  assert "lr_decay_epochs=()" in config_check.decay_warning(c, 10, 50)


def test_build_experiment_prints_the_decay_warning_once(capsys):
  from metaug_jax import train
  import digits  # configs/digits.py
  c = digits.get_config("tiny")                     # 6 steps, decays at epochs 30 and 35
  c.num_devices = 1
  train.build_experiment(c)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
  assert len(lines) == 1 and "(30,35)" in lines[0], lines


def test_override_values_parse_numbers_booleans_and_bracketed_tuples():
  from metaug_jax.config_base import parse_literal, split_top_level
  assert parse_literal("3") == 3 and parse_literal("1e-3") == 0.001
  assert parse_literal("True") is True and parse_literal("moco") == "moco"
  assert parse_literal("(0.8,1.0)") == (0.8, 1.0) and parse_literal("[1, 2]") == [1, 2]
  assert parse_literal("") == ""
  with pytest.raises(ValueError, match="not a literal"):
    parse_literal("(a,b)")
  # compare.py's --grid values: a tuple's commas do not split it.
  assert split_top_level("(0.2,1.0),(0.8,1.0)") == ["(0.2,1.0)", "(0.8,1.0)"]
  assert split_top_level("0.1,0.3") == ["0.1", "0.3"]
  config = config_base.get_base_config()
  config.update_from_flattened_dict({"data.crop_scale": parse_literal("(0.8,1.0)")})
  assert config.data.crop_scale == (0.8, 1.0)
