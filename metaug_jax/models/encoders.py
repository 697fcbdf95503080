"""Per-view encoders (docs/metaug.md §3.1) and the multi-view wrapper.

Every encoder maps NHWC images (B, S, S, C) to a dict with the linear probe's two feature
levels and the contrastive embedding (docs/metaug.md §7, decision A9):
  conv: (B, F_conv) flattened output of the last conv block,
  fc: (B, F_fc) first fc layer after BN + ReLU,
  projection: (B, embedding_dim) the last Dense layer's output before the L2 normalisation
    (what BYOL's and SimSiam's predictors and Barlow Twins' loss read),
  embedding: (B, embedding_dim) L2-normalised, float32.
All outputs are at least float32 whatever the compute dtype; parameters are always float32.
The fc tail that maps `conv` to the projection is the encoder's projector: called with
`project_only=True`, an encoder takes a (B, F_conv) backbone feature instead of images and runs
only that tail, with the same parameters (feature augmentation at the backbone re-projects its
copies this way, docs/feature_augmentation.md §3.3).
"""

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from metaug_jax import config_base, xla_runtime
from metaug_jax.models.layers import (ConvBNReLU, batch_norm, conv, dense, l2_normalize,
                                      maybe_remat, output_dtype)

Dtype = Any

ENCODER_NAMES = ("digits_conv", "alexnet_small", "alexnet_half", "resnet18")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float64": jnp.float64}  # float64: gradient checks in the tests (needs x64)


def _scaled(channels: int, width: float) -> int:
  """Channel count times the width multiplier, at least 1."""
  return max(1, int(round(channels * width)))


def _check_images(x: jax.Array) -> None:
  """Encoders take square NHWC batches."""
  chex.assert_rank(x, 4)
  if x.shape[1] != x.shape[2]:
    raise ValueError(f"encoders expect square NHWC images (B, S, S, C); got shape {x.shape}")


def _head(self_: nn.Module, conv_feat: jax.Array, fc_dims: Sequence[int], train: bool,
          prefix: str, first_index: int) -> dict:
  """Shared fc tail: [Dense -> BN -> ReLU] per entry of fc_dims, then Dense -> L2.

  The first hidden activation is the probe's "fc" level. Layers are named
  f"{prefix}{first_index}", f"{prefix}{first_index + 1}", ... with BNs "bn{index}".
  """
  chex.assert_rank(conv_feat, 2)
  h = conv_feat
  fc_feat = None
  index = first_index
  for dim in fc_dims:
    h = dense(dim, h.shape[-1], dtype=self_.dtype, name=f"{prefix}{index}")(h)
    h = batch_norm(train, self_.axis_name, self_.dtype, name=f"bn{index}")(h)
    h = nn.relu(h)
    if fc_feat is None:
      fc_feat = h
    index += 1
  z = dense(self_.embedding_dim, h.shape[-1], dtype=self_.dtype, name=f"{prefix}{index}")(h)
  out = {
      "conv": conv_feat.astype(output_dtype(z.dtype)),
      "fc": fc_feat.astype(output_dtype(z.dtype)),
      "projection": z.astype(output_dtype(z.dtype)),
      "embedding": l2_normalize(z.astype(output_dtype(z.dtype))),
  }
  batch = conv_feat.shape[0]
  chex.assert_shape(out["embedding"], (batch, self_.embedding_dim))
  chex.assert_shape(out["fc"], (batch, fc_dims[0]))
  return out


class AlexNetHalf(nn.Module):
  """CMC's half AlexNet, exactly the table of docs/metaug.md §3.1 (224x224 input only).

  conv1 11x11/4 p2 ->48, conv2 5x5 p2 ->128, conv3/4 3x3 p1 ->192, conv5 3x3 p1 ->128, each
  conv bias-free + BN + ReLU, max pool 3/2 after conv1, conv2 and conv5; fc6 4608->2048,
  fc7 2048->2048 (bias, BN, ReLU), fc8 2048->embedding_dim, L2. ~14.85M parameters for a
  3-channel input. conv = 6x6x128 conv5 map flattened (4608), fc = fc6 after BN + ReLU (2048).
  `width` scales every channel and fc width (1.0 is the paper's network).
  """
  embedding_dim: int = 128
  width: float = 1.0
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv1_weight_grad: str = "xla"   # input conv's kernel derivative (layers.conv)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, project_only: bool = False) -> dict:
    if project_only:
      return self.projector(x, train)
    _check_images(x)
    if x.shape[1] != 224:
      raise ValueError(
          f"AlexNetHalf (docs/metaug.md §3.1) needs 224x224 inputs, got "
          f"{x.shape[1]}x{x.shape[2]}; upsample to 224 (docs/metaug.md, decision A8) or use "
          "encoder='alexnet_small' for 32/64/96 inputs")
    block = maybe_remat(ConvBNReLU, self.remat)
    w = self.width
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    h = x.astype(self.dtype)
    h = block(_scaled(48, w), 11, strides=4, padding=2, pool=(3, 2), name="conv1",
              weight_grad=self.conv1_weight_grad, **kw)(h, train)
    h = block(_scaled(128, w), 5, padding=2, pool=(3, 2), name="conv2", **kw)(h, train)
    h = block(_scaled(192, w), 3, padding=1, name="conv3", **kw)(h, train)
    h = block(_scaled(192, w), 3, padding=1, name="conv4", **kw)(h, train)
    h = block(_scaled(128, w), 3, padding=1, pool=(3, 2), name="conv5", **kw)(h, train)
    chex.assert_shape(h, (x.shape[0], 6, 6, _scaled(128, w)))
    conv_feat = h.reshape((h.shape[0], -1))
    return self.projector(conv_feat, train)

  def projector(self, conv_feat: jax.Array, train: bool) -> dict:
    """The fc tail on a (B, F_conv) backbone feature (`project_only`)."""
    w = self.width
    return _head(self, conv_feat.astype(self.dtype), (_scaled(2048, w), _scaled(2048, w)),
                 train, "fc", 6)


class AlexNetSmall(nn.Module):
  """Our cheap variant of the half AlexNet for native 32/64/96-pixel inputs (not in the paper).

  Same 5-conv + 3-fc shape and conv widths as AlexNetHalf: conv1 5x5 (stride S/32, so every
  input size reaches the same maps) ->48, pool 3/2; conv2 5x5 ->128, pool 3/2; conv3/4 3x3
  ->192; conv5 3x3 ->128, pool 3/2 (pools SAME-padded: 32 -> 16 -> 8 -> 4). conv = 4x4x128
  (2048), fc = fc6 1024 after BN + ReLU, fc7 1024, fc8 embedding_dim, L2 (at width 1.0).
  The input side must be a multiple of 32.
  """
  embedding_dim: int = 128
  width: float = 1.0
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv1_weight_grad: str = "xla"   # input conv's kernel derivative (layers.conv)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, project_only: bool = False) -> dict:
    if project_only:
      return self.projector(x, train)
    _check_images(x)
    size = x.shape[1]
    if size % 32 != 0:
      raise ValueError(f"AlexNetSmall needs an input side that is a multiple of 32 "
                       f"(32, 64, 96, ...), got {size}")
    block = maybe_remat(ConvBNReLU, self.remat)
    w = self.width
    kw = dict(axis_name=self.axis_name, dtype=self.dtype, pool_padding="SAME")
    h = x.astype(self.dtype)
    h = block(_scaled(48, w), 5, strides=size // 32, padding=2, pool=(3, 2), name="conv1",
              weight_grad=self.conv1_weight_grad, **kw)(h, train)
    h = block(_scaled(128, w), 5, padding=2, pool=(3, 2), name="conv2", **kw)(h, train)
    h = block(_scaled(192, w), 3, padding=1, name="conv3", **kw)(h, train)
    h = block(_scaled(192, w), 3, padding=1, name="conv4", **kw)(h, train)
    h = block(_scaled(128, w), 3, padding=1, pool=(3, 2), name="conv5", **kw)(h, train)
    chex.assert_shape(h, (x.shape[0], 4, 4, _scaled(128, w)))
    conv_feat = h.reshape((h.shape[0], -1))
    return self.projector(conv_feat, train)

  def projector(self, conv_feat: jax.Array, train: bool) -> dict:
    """The fc tail on a (B, F_conv) backbone feature (`project_only`)."""
    w = self.width
    return _head(self, conv_feat.astype(self.dtype), (_scaled(1024, w), _scaled(1024, w)),
                 train, "fc", 6)


class BasicBlock(nn.Module):
  """ResNet BasicBlock (He et al. 2016): two 3x3 conv-BN, projection shortcut when needed."""
  features: int
  strides: int = 1
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = conv(self.features, 3, x.shape[-1], strides=self.strides, padding=1, dtype=self.dtype,
             name="conv1")(x)
    y = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn1")(y))
    y = conv(self.features, 3, self.features, padding=1, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train, self.axis_name, self.dtype, name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, x.shape[-1], strides=self.strides, padding=0,
                      dtype=self.dtype, name="shortcut_conv")(x)
      shortcut = batch_norm(train, self.axis_name, self.dtype, name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """CIFAR-style ResNet-18: 3x3 stem, no max pool, stages [64,128,256,512]*width, 2 blocks each.

  conv = global-average-pooled last stage (512 at width 1); fc = hidden projection
  Dense(2048*width) -> BN -> ReLU; then Dense(embedding_dim) -> L2.
  """
  embedding_dim: int = 128
  width: float = 1.0
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv1_weight_grad: str = "xla"   # input conv's kernel derivative (layers.conv)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, project_only: bool = False) -> dict:
    if project_only:
      return self.projector(x, train)
    _check_images(x)
    w = self.width
    h = x.astype(self.dtype)
    h = ConvBNReLU(_scaled(64, w), 3, padding=1, axis_name=self.axis_name, dtype=self.dtype,
                   weight_grad=self.conv1_weight_grad, name="stem")(h, train)
    block = maybe_remat(BasicBlock, self.remat)
    for stage, (channels, strides) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
      for b in range(2):
        h = block(_scaled(channels, w), strides if b == 0 else 1, axis_name=self.axis_name,
                  dtype=self.dtype, name=f"stage{stage + 1}_block{b + 1}")(h, train)
    conv_feat = jnp.mean(h.astype(output_dtype(h.dtype)), axis=(1, 2)).astype(self.dtype)
    return self.projector(conv_feat, train)

  def projector(self, conv_feat: jax.Array, train: bool) -> dict:
    """The fc tail on a (B, F_conv) backbone feature (`project_only`)."""
    w = self.width
    return _head(self, conv_feat.astype(self.dtype), (_scaled(2048, w),), train, "fc", 1)


class DigitsConvNet(nn.Module):
  """Small, fast conv net for 16x16 grey digits: the quick-start model on a CPU (not in paper).

  conv3x3 32 -> conv3x3 32 -> max pool 2 -> conv3x3 64 -> max pool 2 (each conv bias-free +
  BN + ReLU), conv = 4x4x64 flattened (1024 at 16x16 input); fc = Dense(256) -> BN -> ReLU;
  then Dense(embedding_dim) -> L2. `width` scales all channels and the fc width.
  """
  embedding_dim: int = 128
  width: float = 1.0
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv1_weight_grad: str = "xla"   # input conv's kernel derivative (layers.conv)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, project_only: bool = False) -> dict:
    if project_only:
      return self.projector(x, train)
    _check_images(x)
    block = maybe_remat(ConvBNReLU, self.remat)
    w = self.width
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    h = x.astype(self.dtype)
    h = block(_scaled(32, w), 3, padding=1, name="conv1", weight_grad=self.conv1_weight_grad,
              **kw)(h, train)
    h = block(_scaled(32, w), 3, padding=1, pool=(2, 2), name="conv2", **kw)(h, train)
    h = block(_scaled(64, w), 3, padding=1, pool=(2, 2), name="conv3", **kw)(h, train)
    conv_feat = h.reshape((h.shape[0], -1))
    return self.projector(conv_feat, train)

  def projector(self, conv_feat: jax.Array, train: bool) -> dict:
    """The fc tail on a (B, F_conv) backbone feature (`project_only`)."""
    w = self.width
    return _head(self, conv_feat.astype(self.dtype), (_scaled(256, w),), train, "fc", 1)


_ENCODERS = {
    "digits_conv": DigitsConvNet,
    "alexnet_small": AlexNetSmall,
    "alexnet_half": AlexNetHalf,
    "resnet18": ResNet18,
}


# ---- input sizes -------------------------------------------------------------------------
# The spatial arithmetic of the modules above, so that a config is checked before any init:
# a conv maps s to (s + 2p - k) // stride + 1, a VALID max pool to (s - w) // stride + 1 and a
# SAME one to ceil(s / stride). tests/test_config_check.py checks it against initialisations.


def _conv_side(s: int, kernel: int, stride: int, pad: int) -> int:
  """Output side of a square conv (0: the kernel does not fit)."""
  return (s + 2 * pad - kernel) // stride + 1 if stride >= 1 and s + 2 * pad >= kernel else 0


def _valid_pool_side(s: int, window: int, stride: int) -> int:
  """Output side of a VALID max pool (0: the window does not fit)."""
  return (s - window) // stride + 1 if s >= window else 0


def _same_pool_side(s: int, stride: int) -> int:
  """Output side of a SAME max pool."""
  return -(-s // stride)


def conv_map_side(encoder: str, size: int) -> int:
  """Side of `encoder`'s last conv map for size x size inputs (0: the input is too small)."""
  if size < 1:
    return 0
  if encoder == "digits_conv":    # 3x3 p1 convs keep the side; two 2/2 VALID pools
    return _valid_pool_side(_valid_pool_side(size, 2, 2), 2, 2)
  if encoder == "resnet18":       # 3x3 p1 stem, then three 3x3 p1 stride-2 stages
    for _ in range(3):
      size = _conv_side(size, 3, 2, 1)
    return size
  if encoder == "alexnet_half":   # conv1 11x11/4 p2, VALID 3/2 pools after conv1, 2 and 5
    s = _valid_pool_side(_conv_side(size, 11, 4, 2), 3, 2)
    return _valid_pool_side(_valid_pool_side(s, 3, 2), 3, 2)
  if encoder == "alexnet_small":  # conv1 5x5 p2 stride size // 32, SAME 3/2 pools
    s = _conv_side(size, 5, size // 32, 2)
    return _same_pool_side(_same_pool_side(_same_pool_side(s, 2), 2), 2) if s else 0
  raise ValueError(f"unknown encoder {encoder!r}; allowed: {', '.join(ENCODER_NAMES)}")


# The fc6 sizes are fixed by the conv map of one input size (AlexNetHalf: 6x6 at 224;
# AlexNetSmall: 4x4 at every multiple of 32), and each module refuses other sizes.
_SIZE_RULES = {
    "alexnet_half": (lambda s: s == 224, "224 only"),
    "alexnet_small": (lambda s: s % 32 == 0, "a multiple of 32 (32, 64, 96, ...)"),
}


def accepts_input_size(encoder: str, size: int) -> bool:
  """Whether `encoder` initialises on size x size inputs."""
  rule = _SIZE_RULES.get(encoder, (lambda s: True, ""))[0]
  return conv_map_side(encoder, size) >= 1 and rule(size)


def smallest_input_size(encoder: str) -> int:
  """The smallest input side `encoder` accepts."""
  return next(s for s in range(1, 1025) if accepts_input_size(encoder, s))


def input_sizes_text(encoder: str) -> str:
  """The input sides `encoder` accepts, in words: '224 only', '>= 4', ..."""
  if encoder in _SIZE_RULES:
    return _SIZE_RULES[encoder][1]
  return f">= {smallest_input_size(encoder)}"


def parse_dtype(name: str) -> Dtype:
  """Maps the config string "float32" / "bfloat16" to a jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"model dtype must be one of {tuple(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def build_encoder(model_config: Any, axis_name: Optional[str] = None,
                  name: Optional[str] = None) -> nn.Module:
  """Builds the encoder named by `model_config.encoder` (config `model` section).

  Reads encoder, embedding_dim, width, dtype and the optional `remat` (default False) and
  `conv1_weight_grad` (default "auto", see `conv1_weight_grad`). `name` is the Flax submodule
  name when built inside another module.
  """
  encoder = model_config.encoder
  if encoder not in _ENCODERS:
    raise ValueError(f"unknown encoder {encoder!r}; allowed: {', '.join(ENCODER_NAMES)}")
  return _ENCODERS[encoder](
      embedding_dim=int(model_config.embedding_dim), width=float(model_config.width),
      axis_name=axis_name, dtype=parse_dtype(model_config.dtype),
      remat=bool(model_config.get("remat", False)),
      conv1_weight_grad=conv1_weight_grad(encoder,
                                          model_config.get("conv1_weight_grad", "auto")),
      name=name)


def conv1_weight_grad(encoder: str, choice: str, backend: Optional[str] = None,
                      eigen_convolutions: Optional[bool] = None) -> str:
  """How the input conv's kernel derivative is computed: "xla" or "patches" (`patch_conv`).

  "auto" picks "patches" only for alexnet_half (11x11 stride-4 conv1) on a CPU backend whose
  convolutions run on YNNPACK, the one case measured faster (there its backward-filter conv is
  ~3x slower). XLA:CPU's Eigen kernels (`config.xla_cpu_conv_library`, read from XLA_FLAGS
  unless `eigen_convolutions` is given) beat the patches, as does XLA on GPUs/TPUs and for
  the stride-1/2 input convs of the other encoders.
  """
  allowed = config_base.CONV1_WEIGHT_GRADS
  if choice not in allowed:
    raise ValueError(f"model.conv1_weight_grad must be one of {allowed}, got {choice!r}")
  if choice != "auto":
    return choice
  backend = backend or jax.default_backend()
  if eigen_convolutions is None:
    eigen_convolutions = xla_runtime.cpu_convolutions_use_eigen()
  use_patches = encoder == "alexnet_half" and backend == "cpu" and not eigen_convolutions
  return "patches" if use_patches else "xla"


class MultiViewEncoder(nn.Module):
  """One encoder per view (CMC/MetAug, docs/metaug.md §3.1, difference D5) or a single shared
  one (SimCLR).

  Submodules are named view_0, view_1, ... (params['view_0'], ...). With share=True there is
  one encoder, `view_0`, and the views are concatenated along the batch so that BatchNorm
  sees all views in one batch and its running statistics are updated once.
  """
  model_config: Any
  num_views: int
  axis_name: Optional[str] = None
  share: bool = False

  def __post_init__(self):
    # A mutable ConfigDict would make the module unhashable (e.g. as a jit static argument).
    if (isinstance(self.model_config, ml_collections.ConfigDict)
        and not isinstance(self.model_config, ml_collections.FrozenConfigDict)):
      object.__setattr__(self, "model_config", ml_collections.FrozenConfigDict(self.model_config))
    super().__post_init__()

  @nn.compact
  def __call__(self, views: Sequence[jax.Array], train: bool) -> tuple[dict, ...]:
    if len(views) != self.num_views:
      raise ValueError(f"expected {self.num_views} views, got {len(views)}")
    for v in views:
      chex.assert_rank(v, 4)
    if not self.share:
      return tuple(
          build_encoder(self.model_config, self.axis_name, name=f"view_{i}")(v, train)
          for i, v in enumerate(views))
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1:
      raise ValueError(f"a shared encoder needs views of one shape, got {sorted(shapes)}")
    batch = views[0].shape[0]
    out = build_encoder(self.model_config, self.axis_name, name="view_0")(
        jnp.concatenate(views, axis=0), train)
    return tuple({k: a[i * batch:(i + 1) * batch] for k, a in out.items()}
                 for i in range(self.num_views))
