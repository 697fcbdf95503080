"""STL-10 with the paper's MetAug settings; pre-trains on train+unlabelled, probes on train/test
(docs/metaug.md, decision A7).

COMMAND: python -m metaug_jax.main --config=configs/stl10.py --workdir=runs/stl10 --config.data_dir=DIR
Needs the data (README: "Datasets") and an accelerator for the full 300 epochs of three AlexNets
at 224x224. Arguments: `configs/stl10.py:small` (native-resolution AlexNet variant), `:cmc`,
`:oucl_only` (baselines), `:legacy` (the authors' earlier meta step); combine with commas.
"""

from metaug_jax.config_base import paper_config


def get_config(arg: str = ""):
  return paper_config("stl10", arg)
