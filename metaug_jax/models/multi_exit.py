"""A backbone with one exit per depth stage (Zhang & Ma, CVPR 2022, Fig. 3b;
docs/hierarchical_augmentation.md): `__call__(x, exit=s)` runs the stem and stages 1..s only
and returns a pooled feature of the last stage's width from every exit.

Exits s < last go through an exit head (the self-distillation heads of the same lab): a 1x1
prep conv, an attention gate sigmoid(BN(upsample(SepConv_stride2(x)))) multiplied in, a chain
of stride-2 SepConv blocks doubling the channels up to the last stage's, a 1x1 conv to the
last stage's output width, BN, ReLU and a global average pool. The last exit is the plain
global average pool of the last stage: the ordinary backbone, what the linear probe reads.

Architectures: "resnet18" (CIFAR stem: 3x3 conv, no max pool; BasicBlocks [2, 2, 2, 2]),
"resnet50" (ImageNet stem: 7x7/2 conv + 3x3/2 max pool; bottlenecks [3, 4, 6, 3], expansion
4, last BN of each block zero-initialised) and "digits" (a small CPU net: one 3x3 conv block
per stage, 16/32/64/128 channels, strides 1/2/2/2).

The exit heads' depthwise convs run as shifted multiply-adds on CPU (`depthwise="auto"`),
where XLA's grouped convolution and its gradients are several times slower; same parameters
and values as the grouped convolution used elsewhere.
"""

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from metaug_jax.models.encoders import BasicBlock
from metaug_jax.models.layers import (ConvBNReLU, batch_norm, conv, max_pool, output_dtype,
                                      torch_kernel_init)

Dtype = Any
ARCHS = ("digits", "resnet18", "resnet50")
DEPTHWISE = ("auto", "xla", "shifted")   # how the exit heads' depthwise convs are computed
NUM_STAGES = 4
_CHANNELS = {"digits": (16, 32, 64, 128), "resnet18": (64, 128, 256, 512),
             "resnet50": (64, 128, 256, 512)}
_BLOCKS = {"digits": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
_EXPANSION = {"digits": 1, "resnet18": 1, "resnet50": 4}


def _scaled(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


def stage_channels(arch: str, width: float) -> tuple[int, ...]:
  """Base channels of the four stages (before a bottleneck's expansion)."""
  return tuple(_scaled(c, width) for c in _CHANNELS[arch])


def feature_dim(arch: str, width: float) -> int:
  """The pooled width every exit returns: the last stage's output channels."""
  if arch not in ARCHS:
    raise ValueError(f"unknown multi-exit architecture {arch!r}; allowed: {', '.join(ARCHS)}")
  return stage_channels(arch, width)[-1] * _EXPANSION[arch]


def shifted_depthwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count: int = 1, precision=None,
                           preferred_element_type=None):
  """`lax.conv_general_dilated` of an NHWC depthwise conv (kernel (kh, kw, 1, C), C groups)
  as kh * kw shifted, strided multiply-adds: the same values, for
  `nn.Conv(conv_general_dilated=...)`. XLA:CPU runs its grouped convolution and their
  gradients several times slower than these elementwise ops."""
  del precision   # elementwise products: exact in the compute dtype
  c = lhs.shape[-1]
  trivial = all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  nhwc = dimension_numbers in (None, ("NHWC", "HWIO", "NHWC")) or \
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == \
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if not (lhs.ndim == 4 and feature_group_count == c and rhs.shape[2:] == (1, c) and trivial
          and nhwc and preferred_element_type is None):
    raise ValueError("shifted_depthwise_conv computes 2-D NHWC depthwise convs only")
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  (top, bottom), (left, right) = padding
  x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  (kh, kw), (sh, sw) = rhs.shape[:2], window_strides
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return sum(x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] * rhs[i, j, 0]
             for i in range(kh) for j in range(kw))


def resolve_depthwise(choice: str) -> str:
  """"auto": shifted multiply-adds on CPU, XLA's grouped convolution elsewhere."""
  if choice not in DEPTHWISE:
    raise ValueError(f"depthwise must be one of {DEPTHWISE}, got {choice!r}")
  if choice == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "xla"
  return choice


class SepConv(nn.Module):
  """depthwise 3x3 (stride) -> 1x1 -> BN -> ReLU -> depthwise 3x3 -> 1x1 (to `features`) ->
  BN -> ReLU (the exit heads' block). `depthwise` (DEPTHWISE) picks how the depthwise convs
  are computed; parameters and values are the same either way."""
  features: int
  strides: int = 1
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    shifted = resolve_depthwise(self.depthwise) == "shifted"
    def depthwise(strides, name):
      return nn.Conv(c, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                     feature_group_count=c, use_bias=False, dtype=self.dtype,
                     param_dtype=jnp.float32, kernel_init=torch_kernel_init, name=name,
                     conv_general_dilated=shifted_depthwise_conv if shifted else None)
    x = depthwise(self.strides, "dw1")(x)
    x = conv(c, 1, c, padding=0, dtype=self.dtype, name="pw1")(x)
    x = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn1")(x))
    x = depthwise(1, "dw2")(x)
    x = conv(self.features, 1, c, padding=0, dtype=self.dtype, name="pw2")(x)
    return nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn2")(x))


class ExitHead(nn.Module):
  """Pooled (B, out_features) feature of a stage-s map: prep, attention gate, SepConv chain
  (`num_blocks` stride-2 blocks doubling `mid` channels), 1x1 conv, BN, ReLU, average pool."""
  mid: int
  num_blocks: int
  out_features: int
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(axis_name=self.axis_name, dtype=self.dtype, depthwise=self.depthwise)
    h = conv(self.mid, 1, x.shape[-1], padding=0, dtype=self.dtype, name="prep")(x)
    h = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="prep_bn")(h))
    g = SepConv(self.mid, strides=2, name="gate", **kw)(h, train)
    g = jax.image.resize(g, h.shape, "bilinear")
    g = nn.sigmoid(batch_norm(train, self.axis_name, self.dtype, name="gate_bn")(g))
    h = h * g
    channels = self.mid
    for i in range(self.num_blocks):
      channels *= 2
      h = SepConv(channels, strides=2, name=f"scala{i + 1}", **kw)(h, train)
    h = conv(self.out_features, 1, h.shape[-1], padding=0, dtype=self.dtype, name="out")(h)
    h = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="out_bn")(h))
    return jnp.mean(h.astype(output_dtype(h.dtype)), axis=(1, 2))


class Bottleneck(nn.Module):
  """ResNet bottleneck 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut when needed; the
  last BN starts at scale 0 (zero_init_residual, as the authors' ResNet-50)."""
  features: int
  strides: int = 1
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = self.features * 4
    y = conv(self.features, 1, x.shape[-1], padding=0, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn1")(y))
    y = conv(self.features, 3, self.features, strides=self.strides, padding=1,
             dtype=self.dtype, name="conv2")(y)
    y = nn.relu(batch_norm(train, self.axis_name, self.dtype, name="bn2")(y))
    y = conv(out, 1, self.features, padding=0, dtype=self.dtype, name="conv3")(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     axis_name=self.axis_name if train else None, dtype=self.dtype,
                     param_dtype=jnp.float32, scale_init=nn.initializers.zeros,
                     name="bn3")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out:
      shortcut = conv(out, 1, x.shape[-1], strides=self.strides, padding=0, dtype=self.dtype,
                      name="shortcut_conv")(x)
      shortcut = batch_norm(train, self.axis_name, self.dtype, name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class MultiExitEncoder(nn.Module):
  """The multi-exit backbone: (B, S, S, C) images -> (B, feature_dim) pooled features of exit
  `exit_` (static), computed from the stem and stages 1..exit_ only."""
  arch: str = "resnet18"
  width: float = 1.0
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  depthwise: str = "auto"        # the exit heads' depthwise convs (DEPTHWISE)

  @nn.compact
  def __call__(self, x: jax.Array, exit_: int, train: bool) -> jax.Array:
    chex.assert_rank(x, 4)
    if self.arch not in ARCHS:
      raise ValueError(f"unknown multi-exit architecture {self.arch!r}; allowed: "
                       f"{', '.join(ARCHS)}")
    if not 1 <= exit_ <= NUM_STAGES:
      raise ValueError(f"exit must be in 1..{NUM_STAGES}, got {exit_}")
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    channels = stage_channels(self.arch, self.width)
    expansion = _EXPANSION[self.arch]
    h = x.astype(self.dtype)
    if self.arch == "resnet18":
      h = ConvBNReLU(channels[0], 3, padding=1, name="stem", **kw)(h, train)
    elif self.arch == "resnet50":
      h = ConvBNReLU(channels[0], 7, strides=2, padding=3, name="stem", **kw)(h, train)
      h = max_pool(h, 3, 2, 1)
    for stage in range(exit_):   # stages after the exit are never built nor run
      for b in range(_BLOCKS[self.arch][stage]):
        strides = (1 if stage == 0 else 2) if b == 0 else 1
        name = f"stage{stage + 1}_block{b + 1}"
        if self.arch == "digits":
          h = ConvBNReLU(channels[stage], 3, strides=strides, padding=1, name=name,
                         **kw)(h, train)
        elif self.arch == "resnet18":
          h = BasicBlock(channels[stage], strides, name=name, **kw)(h, train)
        else:
          h = Bottleneck(channels[stage], strides, name=name, **kw)(h, train)
    out_dim = channels[-1] * expansion
    if exit_ == NUM_STAGES:
      pooled = jnp.mean(h.astype(output_dtype(h.dtype)), axis=(1, 2))
    else:
      pooled = ExitHead(mid=channels[exit_ - 1], num_blocks=NUM_STAGES - exit_,
                        out_features=out_dim, depthwise=self.depthwise,
                        name=f"exit{exit_}_head", **kw)(h, train)
    chex.assert_shape(pooled, (x.shape[0], out_dim))
    return pooled.astype(output_dtype(self.dtype))

  def all_exits(self, x: jax.Array, exits, train: bool = False) -> tuple:
    """Every exit of `exits` on the same input (initialises all their parameters)."""
    return tuple(self(x, e, train) for e in exits)
