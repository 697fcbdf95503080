"""Quick start on scikit-learn's bundled handwritten digits (no download): full MetAug.

COMMAND: python -m metaug_jax.main --config=configs/digits.py --workdir=runs/digits
Pre-training and the linear probe take a few minutes on a 2-core CPU. Variants:
`configs/digits.py:NAME` selects any method (`:cmc`, `:simclr`, `:moco`, `:byol`, `:simsiam`,
`:barlow_twins`, ...; `:oucl_only` is `metaug_oucl_only`); `:tiny` is a seconds-long smoke run
used by the tests, combinable with the others (`:moco,tiny`).
"""

from metaug_jax.config_base import apply_small_config_arguments, get_base_config


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
  return apply_small_config_arguments(c, arg, "digits")
