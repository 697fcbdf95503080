"""Methods by name: `build(config, facts)` returns the object whose train_step is pmapped."""

from metaug_jax.methods.base import DataFacts, Method
from metaug_jax.methods.common import TrainState
from metaug_jax.methods.contrastive import CMC, SimCLR
from metaug_jax.methods.metaug import MetAug

REGISTRY = {"simclr": SimCLR, "cmc": CMC, "metaug_oucl_only": MetAug, "metaug": MetAug}


def build(config, facts: DataFacts) -> Method:
  if config.method not in REGISTRY:
    raise ValueError(f"unknown method {config.method!r}; choose one of {sorted(REGISTRY)}")
  return REGISTRY[config.method](config, facts)

__all__ = ["CMC", "DataFacts", "Method", "MetAug", "REGISTRY", "SimCLR", "TrainState", "build"]
