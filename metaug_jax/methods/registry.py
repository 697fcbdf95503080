"""Methods by name, each defined in one module of this package by `@register(...)`.

A method's registration carries everything the rest of the library reads about it: the class
whose `train_step` is pmapped, its config section and the valid range of each numeric field
there, the config variant that `configs/*.py:NAME` applies, and the paper rows (with their
reported numbers) that `experiments/compare.py` prints. Config validation, the config files'
variants, the comparison and the benchmark all read this registry, so a new method is one
module (plus its tests) and nothing else.
"""

import dataclasses
from typing import Callable, Optional

import ml_collections


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of a paper's table reproduced by this method with `overrides` on top."""
  label: str                        # as printed in the paper, e.g. "SimCLR + Debiased"
  overrides: dict                   # config fields that make the row, e.g. {"loss.negatives": ...}
  numbers: dict                     # {dataset: (conv, fc)} linear-probe top-1 %
  source: str = "MetAug Table 1"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What the library knows about a method (see `register`)."""
  name: str
  cls: type
  summary: str
  section: Optional[str] = None                  # config field holding its own settings
  defaults: Optional[Callable[[], ml_collections.ConfigDict]] = None
  ranges: Optional[dict] = None                  # section field -> config_check.Range/Choice
  variant: Optional[Callable[[ml_collections.ConfigDict], None]] = None
  check: Optional[Callable[[ml_collections.ConfigDict], list]] = None
  paper_rows: tuple = ()


_SPECS: dict = {}
TABLE1_DATASETS = ("tiny_imagenet", "stl10", "cifar10", "cifar100")
TABLE1_SOURCE = PaperRow.source  # the default: MetAug's Table 1 (other papers' rows say so)


def table1_rows() -> list:
  """[(spec, row)] of every registered row from MetAug's Table 1, in registration order."""
  return [(spec, row) for spec in _SPECS.values() for row in spec.paper_rows
          if row.source == TABLE1_SOURCE]


def table1(*conv_fc: float) -> dict:
  """{dataset: (conv, fc)} from Table 1's eight numbers in its column order (Tiny ImageNet,
  STL-10, CIFAR-10, CIFAR-100; conv then fc for each)."""
  assert len(conv_fc) == 2 * len(TABLE1_DATASETS), conv_fc
  return {d: (conv_fc[2 * i], conv_fc[2 * i + 1]) for i, d in enumerate(TABLE1_DATASETS)}


def register(name: str, *, summary: str, section: Optional[str] = None,
             defaults: Optional[Callable[[], ml_collections.ConfigDict]] = None,
             ranges: Optional[dict] = None,
             variant: Optional[Callable[[ml_collections.ConfigDict], None]] = None,
             check: Optional[Callable[[ml_collections.ConfigDict], list]] = None,
             paper_rows: tuple = ()):
  """Class decorator: makes `name` a value of `config.method`.

  Args:
    name: the config.method value (and the config-file variant, `configs/digits.py:NAME`).
    summary: one line for listings and errors.
    section: name of the config section with the method's own fields (config.<section>),
      created from `defaults()` in the base config; several methods may share one.
    defaults: returns the section's ConfigDict with every field and its default.
    ranges: {field: config_check.Range or Choice} for every number and choice of the
      section, checked by config validation like the base config's fields.
    variant: edits a dataset config into this method's setup (views, encoder sharing, ...);
      `apply_variant` then sets `config.method = name`.
    check: returns one line per problem of a config that selects this method (config
      validation prints them with the others).
    paper_rows: PaperRow entries that experiments/compare.py prints beside our numbers.
  """
  def wrap(cls):
    if name in _SPECS:
      raise ValueError(f"method {name!r} is registered twice ({_SPECS[name].cls} and {cls})")
    _SPECS[name] = MethodSpec(name=name, cls=cls, summary=summary, section=section,
                              defaults=defaults, ranges=ranges, variant=variant,
                              check=check, paper_rows=tuple(paper_rows))
    return cls
  return wrap


def specs() -> dict:
  """{name: MethodSpec} of every registered method, in registration order."""
  return dict(_SPECS)


def names() -> tuple:
  return tuple(_SPECS)


def get(name: str) -> MethodSpec:
  if name not in _SPECS:
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_SPECS)}")
  return _SPECS[name]


def config_sections() -> dict:
  """{section name: defaults ConfigDict} over all methods (a shared section appears once)."""
  out = {}
  for spec in _SPECS.values():
    if spec.section and spec.section not in out:
      out[spec.section] = spec.defaults()
  return out


def section_ranges() -> dict:
  """{"section.field": Range or Choice} over all methods' sections."""
  out = {}
  for spec in _SPECS.values():
    for field, bounds in (spec.ranges or {}).items():
      out[f"{spec.section}.{field}"] = bounds
  return out


def apply_variant(config: ml_collections.ConfigDict, name: str) -> None:
  """Turns a dataset config into method `name`'s setup (configs/*.py:NAME)."""
  spec = get(name)
  if spec.variant is not None:
    spec.variant(config)
  config.method = name
