"""CIFAR-10 with the paper's MetAug settings (docs/metaug.md §5.4): 3 Lab views, half AlexNet
at 224x224.

COMMAND: python -m metaug_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 --config.data_dir=DIR
Needs the data (README: "Datasets") and an accelerator for the full 300 epochs of three AlexNets
at 224x224. Arguments: `configs/cifar10.py:small` (native-resolution AlexNet variant), `:cmc`,
`:oucl_only` (baselines), `:legacy` (the authors' earlier meta step); combine with commas.
"""

from metaug_jax.config_base import paper_config


def get_config(arg: str = ""):
  return paper_config("cifar10", arg)
