"""Tiny ImageNet (a local folder: train/<wnid>/images/*.JPEG, val/) with the paper's settings.

COMMAND: python -m metaug_jax.main --config=configs/tiny_imagenet.py --workdir=runs/tiny_imagenet --config.data_dir=DIR
Needs the data (README: "Datasets") and an accelerator for the full 300 epochs of three AlexNets
at 224x224. Arguments: `configs/tiny_imagenet.py:small` (native-resolution AlexNet variant), `:cmc`,
`:oucl_only` (baselines), `:legacy` (the authors' earlier meta step); combine with commas.
"""

from metaug_jax.config_base import paper_config


def get_config(arg: str = ""):
  return paper_config("tiny_imagenet", arg)
