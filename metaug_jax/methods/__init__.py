"""Methods by name: `build(config, facts)` returns the object whose train_step is pmapped.

Every module of this package that defines a method registers it (`registry.register`); they
are all imported here, so `registry.names()` lists every `config.method` value.
"""

import importlib
import pkgutil

from metaug_jax.methods import registry
from metaug_jax.methods.base import DataFacts, Method
from metaug_jax.methods.common import TrainState

_INFRASTRUCTURE = {"base", "common", "registry"}
for _module in pkgutil.iter_modules(__path__):
  if _module.name not in _INFRASTRUCTURE:
    importlib.import_module(f"{__name__}.{_module.name}")


def build(config, facts: DataFacts) -> Method:
  """The method `config.method` for data described by `facts`."""
  return registry.get(config.method).cls(config, facts)


__all__ = ["DataFacts", "Method", "TrainState", "build", "registry"]
