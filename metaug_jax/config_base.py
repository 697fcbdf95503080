"""The base experiment config: every field that any module reads, with its default.

Files under `configs/` start from `get_base_config()` and override what their dataset and
method need. Every field is overridable from the command line (`--config.optim.lr=0.1`).
Tuples, not lists, so that ml_collections can override them from flags.
"""

import ast

import ml_collections

NEGATIVES = ("plain", "debiased", "hard")  # loss.negatives
DATASETS = ("digits", "cifar10", "cifar100", "stl10", "tiny_imagenet", "cifar_archive",
            "folder", "npz", "fashion_mnist", "idx")
VIEW_KINDS = ("lab", "lab2", "augmented_copies", "simclr")
ENCODERS = ("digits_conv", "alexnet_small", "alexnet_half", "resnet18")
CONV1_WEIGHT_GRADS = ("auto", "xla", "patches")  # model.conv1_weight_grad
XLA_CPU_SCHEDULERS = ("concurrency", "memory")  # xla_cpu_scheduler
XLA_CPU_CONV_LIBRARIES = ("eigen", "xla_default")  # xla_cpu_conv_library
MATMUL_PRECISIONS = ("default", "high", "highest")  # model.matmul_precision
BANK_INITS = ("random", "encoder")  # bank.init (docs/contrastive_baselines.md §3.1)


def parse_literal(text: str):
  """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, '(0.8,1.0)' -> (0.8, 1.0), else the string:
  values of field=value overrides (a tuple or list field, e.g. data.crop_scale, takes a
  bracketed literal)."""
  text = text.strip()
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if text and text[0] in "([" and text[-1] in ")]":
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"{text!r} looks like a tuple or list but is not a literal one: {e}") from e
  return {"True": True, "False": False}.get(text, text)


def split_top_level(text: str, sep: str = ",") -> list:
  """'a,(1,2),b' -> ['a', '(1,2)', 'b']: `text` split at the `sep` outside brackets."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char in "([":
      depth += 1
    elif char in ")]":
      depth -= 1
    if char == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all setups (the quick-start digits values where a choice is needed)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "metaug"            # a method registered in metaug_jax/methods/ (README: Methods)
  c.num_devices = 0              # 0: all local devices; n: the first n (pmap'ed over them)

  # ---- data -------------------------------------------------------------------------------
  c.dataset = "digits"           # one of DATASETS
  c.data_dir = ""                # tfds data_dir, or the folder / archive / .npz file (or a folder
                                 # holding one .npz, or train.npz + test.npz), or IDX folder
  c.download = False             # let tfds download and prepare (needs network + tensorflow)
  c.data = ml_collections.ConfigDict()
  c.data.views = "augmented_copies"  # one of VIEW_KINDS (docs/metaug.md §2.1)
  c.data.num_views = 2           # for augmented_copies / simclr views
  c.data.input_size = 16         # side of the square image the encoder sees
  c.data.crop_scale = (0.3, 1.0)  # RandomResizedCrop area range (paper: 0.2-1.0)
  c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.flip = False            # random horizontal flip (off for digits: 2 vs 5 etc.)
  c.data.max_rotation_deg = 12.0  # grey augmented copies only
  c.data.max_translate = 0.1     # fraction of the image side; grey augmented copies only
  c.data.noise_std = 0.05        # grey augmented copies only
  c.data.jitter_strength = 0.5   # simclr views: colour jitter strength
  c.data.grey_probability = 0.2  # simclr views: random greyscale
  c.data.test_fraction = 0.2     # digits / folder / npz without a test file: held-out fraction
  c.data.split_seed = 0          # the seeded train/test split of digits, folder and npz
  c.data.max_train_examples = 0  # >0: a seeded subset of the training images (0: all of them)
  c.data.test_file = ""          # npz: optional separate test file
  c.data.folder_image_size = 0   # folder: resize every image to this side (0: most common size)
  c.data.stl10_pretrain_split = "train+unlabelled"  # docs/metaug.md, decision A7
  c.data.prefetch = 2            # host batches prepared ahead of the device
  c.data.order = "epoch"         # epoch: a seeded permutation per epoch; uniform: every step's
                                 # batch drawn afresh (data/loader.py, ORDERS)

  # ---- model ------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.encoder = "digits_conv"  # one of ENCODERS
  c.model.embedding_dim = 128
  c.model.width = 1.0            # channel multiplier (digits_conv, alexnet_small, resnet18)
  c.model.share_encoder = False  # one encoder for all views (SimCLR) or one per view (CMC)
  c.model.mag_hidden = 2048      # MAG width (docs/metaug.md §3.2)
  c.model.dtype = "float32"      # compute dtype: float32 or bfloat16 (params stay float32)
  c.model.remat = False          # rematerialise the conv blocks (memory for compute)
  # Precision of the training step's float32 matmuls and convolutions (jax's
  # default_matmul_precision): "highest" is exact float32 everywhere; "default" lets GPUs use
  # TF32 and TPUs bfloat16 passes, where the MAG gradient's second-order part (orders of
  # magnitude below its direct part) has not been shown to survive. Same numbers on CPU.
  c.model.matmul_precision = "highest"
  # The input conv's kernel derivative: "xla", "patches" (chunked patch GEMMs, models/
  # patch_conv.py) or "auto" (patches for alexnet_half on CPU with YNNPACK convolutions,
  # where they are ~2x faster; XLA's own otherwise, see xla_cpu_conv_library).
  c.model.conv1_weight_grad = "auto"

  # How XLA:CPU orders the step's operations: "concurrency" (its default, fastest) or
  # "memory" (its memory-minimising scheduler: ~25% less step memory, ~7% slower; with
  # model.remat and xla_cse=False the leanest MetAug step). Other backends ignore it.
  c.xla_cpu_scheduler = "concurrency"
  # XLA's common-subexpression elimination. False keeps model.remat's recomputation on CPU,
  # where jaxlib 0.10's XLA otherwise merges it back into the forward pass (0.11 does not;
  # metaug_jax/xla_runtime.py): with model.remat and the memory scheduler, the leanest step
  # (slower). Set before JAX starts.
  c.xla_cse = True
  # XLA:CPU's convolution kernels: "eigen" (XLA's Eigen kernels; their gradients ran 1.5-2x
  # faster than YNNPACK's, the paper's MetAug step ~1.4x faster) or "xla_default" (what the
  # installed jaxlib picks: YNNPACK in 0.10-0.11). Set before JAX starts (metaug_jax/
  # xla_runtime.py); later, a warning and XLA's default. Other backends ignore it.
  c.xla_cpu_conv_library = "eigen"

  # ---- optimisation -----------------------------------------------------------------------
  c.batch_size = 128             # global batch, split over devices
  c.num_epochs = 40
  c.num_train_steps = 0          # >0 overrides num_epochs
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.03              # encoder SGD (docs/metaug.md §5.4)
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.lr_decay_epochs = (120, 160, 200)  # x lr_decay_rate after each of these epochs
  c.optim.lr_decay_rate = 0.1

  # ---- contrastive losses -----------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.07      # simclr / cmc InfoNCE temperature
  c.loss.oucl_form = 3           # OUCL form 1 (hinge), 2 (circle), 3 (general; code default)
  c.loss.oucl_beta = 16.0
  c.loss.oucl_gamma_pos = 0.0    # gamma+ (form 3 margin of positives)
  c.loss.oucl_gamma_neg = 0.0    # gamma- (form 3 margin of negatives)
  c.loss.oucl_margin = 0.25      # lambda (form 1 hinge margin) / gamma (form 2 circle margin)
  c.loss.oucl_adaptive = False   # circle-style Gamma weights (stop-gradient) in form 3
  c.loss.oucl_scale = "code"     # "code": 16/beta prefactor; "paper": 1/beta
  # InfoNCE negatives of simclr / cmc / moco: "plain", "debiased" (Chuang et al. 2020, class
  # prior tau_plus) or "hard" (Robinson et al. 2021, concentration hard_beta; with tau_plus).
  c.loss.negatives = "plain"
  c.loss.tau_plus = 0.1
  c.loss.hard_beta = 1.0

  # ---- memory bank (CMC NCE-average style, docs/metaug.md §3.3) ----------------------------
  c.bank = ml_collections.ConfigDict()
  c.bank.num_negatives = 1024    # K per bank call
  c.bank.momentum = 0.5
  c.bank.schedule = "clean"      # "clean" (docs/metaug.md, decision A6) or "code_exact"
  c.bank.init = "random"         # "random": CMC's uniform rows; "encoder": every row starts as
                                 # the initial encoder's embedding of its image (BANK_INITS)

  # ---- MetAug (docs/metaug.md §4-5) ---------------------------------------------------------
  c.metaug = ml_collections.ConfigDict()
  c.metaug.algorithm = "paper"   # "paper" (docs/metaug.md §5.1) or "legacy" (§5.3)
  c.metaug.first_order = False   # stop-gradient through the inner gradient (ablation)
  c.metaug.inner_lr = 1e-3       # alpha of the virtual SGD step
  c.metaug.virtual_step_from = "updated"  # "updated": theta after the real step (§5.1);
                                          # "current": fused with Phase A (one pass fewer)
  # How the second-order part -alpha (d g / d omega)^T v of the MAG gradient is taken:
  # "reverse": jax.grad through jax.grad (the inner step's graph is kept for a double
  # backward); "forward_over_reverse": the same mixed derivative as a jvp (along v) of the
  # inner loss's omega-gradient, so no encoder backward graph is differentiated or kept.
  c.metaug.meta_gradient = "forward_over_reverse"
  c.metaug.lambda_aug = 1e-5     # weight of the augmented OUCL terms
  c.metaug.lambda_mi = 1e-11     # weight of the margin-injected regulariser
  c.metaug.margin_type = "large"  # large | medium | small
  c.metaug.margin_pos_scale = 1.0  # code: 1e-4 on the positive part
  c.metaug.margin_detach_thresholds = True  # code: False
  c.metaug.margin_code_exact = False  # thresholds/penalised columns exactly as util.py
  c.metaug.margin_include_all_augmented = False  # also penalise the all-augmented call S4
  c.metaug.mag_lr = 0.03
  c.metaug.mag_momentum = 0.9
  c.metaug.mag_weight_decay = 1e-4

  # ---- loop, logging, checkpoints -----------------------------------------------------------
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.debug_kill_at_step = 0       # tests only: SIGKILL the process at this step (crash drill)

  # ---- evaluation (linear probe on frozen conv / fc features) -------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.probe_after_training = True
  c.eval.probe_epochs = 100
  c.eval.probe_lr = 0.1
  c.eval.probe_batch_size = 256
  c.eval.probe_weight_decay = 1e-4
  c.eval.probe_augment = False   # paper protocol: fresh crop/flip views of the train set per epoch
  c.eval.batch_size = 256        # feature extraction batch
  c.eval.random_init = False     # probe a randomly initialised encoder instead (a baseline)
  c.eval.step = 0                # restore this checkpoint step (0: newest)
  c.eval.knn_k = 20              # weighted kNN monitor / evaluation (Wu et al. 2018 weighting)
  c.eval.knn_temperature = 0.07
  # The probes after training and in `python -m metaug_jax.eval` (README: Restore for
  # evaluation), all on features extracted once per split:
  c.eval.few_label_fractions = (0.01, 0.1)  # linear probes on these fractions of each class's
                                            # labels (() : none)
  c.eval.few_label_draws = 5     # seeded label draws per fraction (mean ± std)
  c.eval.val_fraction = 0.1      # stratified validation split of the training set that picks
                                 # the probe's epoch; test accuracy there (0: no such probe)
  c.eval.val_lrs = ()            # probe lr grid searched on validation (() : eval.probe_lr)
  c.eval.val_weight_decays = ()  # weight decay grid (() : eval.probe_weight_decay)
  c.eval.knn_levels = ("embedding", "fc")  # kNN classifier on these features (() : none)
  c.eval.monitor_every_steps = 0  # >0: kNN accuracy + score histograms every N steps
  c.eval.monitor_examples = 512  # test examples the online monitor classifies
  c.eval.plots = True            # PNG diagnostics in the workdir at the end of training
  c.eval.tsne_max_points = 1000  # test points in the 2-D embedding plot
  c.eval.colour_probe = False    # also the colour-prediction probe (RGB data only)
  c.eval.colour_probe_examples = 10000  # train / test images it uses at most, each (0: all)

  # ---- each method's own section (moco, byol, ...), defined with the method ----------------
  from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
  for name, section in registry.config_sections().items():
    c[name] = section
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The base config as a config file (`--config=metaug_jax/config_base.py`): the default of
  restore-for-eval's --config, so that its --config.FIELD overrides parse without a file."""
  del arg
  return get_base_config()


def paper_config(dataset: str, arg: str = ""):
  """The settings of the authors' code for any of the paper's datasets (docs/metaug.md §5.4,
  §7)."""
  c = get_base_config()
  c.dataset = dataset
  c.method = "metaug"
  c.data.views = "lab"                # L, ab and the full Lab image (docs/metaug.md §2.1)
  c.data.input_size = 224             # every dataset is resized to 224 (decision A8)
  c.data.crop_scale = (0.2, 1.0)
  c.data.flip = True
  c.model.encoder = "alexnet_half"
  c.model.mag_hidden = 2048
  c.batch_size = 64
  c.num_epochs = 300
  c.optim.lr = 0.03
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.lr_decay_epochs = (120, 160, 200)
  c.optim.lr_decay_rate = 0.1
  c.bank.num_negatives = 1024
  c.bank.momentum = 0.5
  c.metaug.lambda_aug = 1e-5
  c.metaug.lambda_mi = 1e-11
  c.metaug.inner_lr = 1e-3
  c.metaug.mag_lr = 0.03
  c.log_every_steps = 50
  c.checkpoint_every_steps = 2000
  c.eval.probe_epochs = 60
  c.eval.probe_lr = 0.1
  c.eval.probe_batch_size = 256
  c.eval.probe_weight_decay = 0.0
  c.eval.probe_augment = True         # docs/metaug.md §7: RandomResizedCrop + flip while probing
  for part in filter(None, arg.split(",")):
    if part == "small":
      c.data.input_size = 32 if dataset in ("cifar10", "cifar100") else 64
      c.model.encoder = "alexnet_small"
      c.batch_size = 128
    elif part == "oucl_only":
      c.method = "metaug_oucl_only"
    elif part == "legacy":
      c.metaug.algorithm = "legacy"
    else:
      from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
      if part not in registry.names():
        raise ValueError(f"unknown config argument {part!r}; use small, oucl_only, legacy or "
                         f"a method: {', '.join(registry.names())}")
      registry.apply_variant(c, part)
  return c


def smoke_run(c: ml_collections.ConfigDict) -> None:
  """`:tiny` of the small-data configs (digits, Fashion-MNIST): a seconds-long run that the
  tests use."""
  c.num_train_steps = 6
  c.batch_size = 32
  c.bank.num_negatives = 32
  c.model.mag_hidden = 64
  c.model.width = 0.5
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval.probe_epochs = 5
  c.eval.few_label_draws = 2
  c.eval.monitor_every_steps = 3
  c.eval.monitor_examples = 64
  c.eval.tsne_max_points = 100
  c.progress_bar = False


def apply_small_config_arguments(c: ml_collections.ConfigDict, arg: str, config_name: str,
                                 tiny=smoke_run) -> ml_collections.ConfigDict:
  """The comma-separated arguments of a small-data config file (`configs/NAME.py:ARGS`):
  `tiny` (applies `tiny(c)`), `oucl_only`, or any registered method's variant."""
  from metaug_jax.methods import registry  # pylint: disable=g-import-not-at-top
  for part in filter(None, arg.split(",")):
    if part == "oucl_only":
      c.method = "metaug_oucl_only"
    elif part in registry.names():
      registry.apply_variant(c, part)
    elif part == "tiny":
      tiny(c)
    else:
      raise ValueError(f"unknown {config_name} config argument {part!r}; use tiny, oucl_only "
                       f"or a method: {', '.join(registry.names())}")
  return c
