"""CIFAR-100 with the paper's MetAug settings (docs/metaug.md §5.4).

COMMAND: python -m metaug_jax.main --config=configs/cifar100.py --workdir=runs/cifar100 --config.data_dir=DIR
Needs the data (README: "Datasets") and an accelerator for the full 300 epochs of three AlexNets
at 224x224. Arguments: `configs/cifar100.py:small` (native-resolution AlexNet variant), `:cmc`,
`:oucl_only` (baselines), `:legacy` (the authors' earlier meta step); combine with commas.
"""

from metaug_jax.config_base import paper_config


def get_config(arg: str = ""):
  return paper_config("cifar100", arg)
