"""Fashion-MNIST (60k + 10k 28x28 grey images, 10 classes): full MetAug on grey data.

COMMAND: python -m metaug_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist --config.data_dir=/usr/share/datasets/fashion-mnist
The IDX files come from `apt-get install dataset-fashion-mnist` (or any folder holding
train-/t10k-images-idx3-ubyte[.gz] and -labels-idx1-); without --config.data_dir a prepared
tfds copy is read. On a CPU, `--config.data.max_train_examples=10000` pre-trains on a seeded
10k subset (the test set stays whole). Variants as in configs/digits.py: `:NAME` selects any
method (`:cmc`, `:simclr`, `:moco`, ...; `:oucl_only` is `metaug_oucl_only`); `:tiny` is a
seconds-long smoke run, combinable with the others (`:moco,tiny`).
"""

from metaug_jax.config_base import (apply_small_config_arguments, get_base_config,
                                    smoke_run)


def get_config(arg: str = ""):
  c = get_base_config()
  c.dataset = "fashion_mnist"
  c.method = "metaug"
  c.data.views = "augmented_copies"   # grey images: no colour to split into L / ab
  c.data.num_views = 2
  c.data.input_size = 28              # native resolution; digits_conv takes 28
  c.data.crop_scale = (0.5, 1.0)
  c.data.flip = True                  # garments and shoes keep their class when mirrored
  c.model.encoder = "digits_conv"
  c.model.mag_hidden = 512
  c.batch_size = 256
  c.num_epochs = 20
  c.optim.lr = 0.03
  c.optim.lr_decay_epochs = (15, 18)
  c.bank.num_negatives = 1024
  # docs/contrastive_baselines.md §3.1: bank rows start as the initial encoder's embeddings
  # (not random unit vectors) and batches are drawn uniformly (no epoch boundary), which
  # removes the loss jump at each epoch and the kNN drop below the random encoder's.
  c.bank.init = "encoder"
  c.data.order = "uniform"
  c.metaug.lambda_aug = 1e-5          # the digits quick start's weights (configs/digits.py)
  c.metaug.lambda_mi = 1e-2
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval.probe_epochs = 50
  c.eval.probe_batch_size = 256
  c.eval.monitor_every_steps = 235    # one epoch of the full 60k
  return apply_small_config_arguments(c, arg, "fashion_mnist", tiny=_tiny)


def _tiny(c) -> None:
  """The smoke run on a 1024-image subset."""
  smoke_run(c)
  c.data.max_train_examples = 1024
