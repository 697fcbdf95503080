"""Quick start on scikit-learn's bundled handwritten digits (no download): full MetAug.

COMMAND: python -m metaug_jax.main --config=configs/digits.py --workdir=runs/digits
Pre-training and the linear probe take a few minutes on a 2-core CPU. Variants:
`configs/digits.py:NAME` selects any method (`:cmc`, `:simclr`, `:moco`, `:byol`, `:simsiam`,
`:barlow_twins`, ...; `:oucl_only` is `metaug_oucl_only`); `:tiny` is a seconds-long smoke run
used by the tests, combinable with the others (`:moco,tiny`).
"""

from metaug_jax.config_base import get_base_config
from metaug_jax.methods import registry


def get_config(arg: str = ""):
  c = get_base_config()
  c.dataset = "digits"
  c.method = "metaug"
  c.data.views = "augmented_copies"   # grey digits have no colour to split into L / ab
  c.data.num_views = 2
  c.data.input_size = 16
  c.data.crop_scale = (0.5, 1.0)
  c.model.encoder = "digits_conv"
  c.model.mag_hidden = 512
  c.batch_size = 128
  c.num_epochs = 40
  c.optim.lr = 0.03
  c.optim.lr_decay_epochs = (30, 35)
  c.bank.num_negatives = 256
  # From the sweep in experiments/results/digits_lambda_sweep.md (1 seed, differences within
  # noise): the paper's lambda_aug, a margin weight of 1e-2 instead of the code's 1e-11.
  c.metaug.lambda_aug = 1e-5
  c.metaug.lambda_mi = 1e-2
  c.checkpoint_every_steps = 100
  c.eval.probe_epochs = 100
  c.eval.probe_batch_size = 128
  c.eval.monitor_every_steps = 55     # 5 epochs
  for part in filter(None, arg.split(",")):
    if part == "oucl_only":
      c.method = "metaug_oucl_only"
    elif part in registry.names():
      registry.apply_variant(c, part)
    elif part == "tiny":
      c.num_train_steps = 6
      c.batch_size = 32
      c.bank.num_negatives = 32
      c.model.mag_hidden = 64
      c.model.width = 0.5
      c.log_every_steps = 2
      c.checkpoint_every_steps = 2
      c.eval.probe_epochs = 5
      c.eval.monitor_every_steps = 3
      c.eval.monitor_examples = 64
      c.eval.tsne_max_points = 100
      c.progress_bar = False
    else:
      raise ValueError(f"unknown digits config argument {part!r}; use tiny, oucl_only or a "
                       f"method: {', '.join(registry.names())}")
  return c
