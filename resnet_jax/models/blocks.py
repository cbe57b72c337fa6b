"""Residual blocks.

A block receives its layers ready-made from the ResNet (`conv`: flax's `nn.Conv` signature,
`norm`, `act`), so its body only says how they are wired; `ResidualBlock.join` adds the
shortcut the same way for every block. A new block type is one subclass here (or in your
own file) and one registry row: see docs/models.md, "Add your own block".
"""

import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# Shortcut kinds:
#   "projection": 1x1 conv + BN when the shape changes, identity otherwise (paper option B,
#                 torchvision).
#   "zero_pad":   parameter-free: subsample spatially and zero-pad the new channels
#                 (paper option A, the CIFAR nets of He et al. 2015, Table 6).
#   "avg_projection": 2x2 average pool (when strided), then a stride-1 1x1 conv + BN: the
#                 ResNet-D shortcut (He et al. 2019 "Bag of Tricks", timm's avg_down), which
#                 sees every input pixel instead of a quarter of them.
#   "none":       no shortcut at all -- the "plain" network of the paper's Fig. 4/6.
# Pre-activation (v2) blocks project the *normalised* input with a bare 1x1 conv (no BN),
# and a stride without a change of width subsamples (Keras' 1x1 max-pool).
SHORTCUTS = ("projection", "zero_pad", "avg_projection", "none")


def block_class(block) -> type:
  """The block class of a registry row's `block` (a class, or a functools.partial of one)."""
  return block.func if isinstance(block, functools.partial) else block


def _subsample(x, strides: int):
  return x[:, ::strides, ::strides, :] if strides > 1 else x


def _avg_pool_ceil(x, strides: int):
  """torch's AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)."""
  if strides == 1:
    return x
  pad = [(0, (-d) % strides) for d in x.shape[1:3]]
  return nn.avg_pool(x, (strides, strides), strides=(strides, strides), padding=pad,
                     count_include_pad=False)


def _zero_pad_shortcut(x, out_channels: int, strides: int):
  x = _subsample(x, strides)
  extra = out_channels - x.shape[-1]
  if extra > 0:
    # Split the padding on both sides as in the reference CIFAR implementations.
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class Shortcut(nn.Module):
  """The identity path of a residual block, matched to the branch's output shape."""
  out_channels: int
  strides: int
  kind: str
  conv: ModuleDef
  norm: ModuleDef | None         # None: a pre-activation block's (projects x_preact, no BN)

  @nn.compact
  def __call__(self, x, x_preact=None):
    same_width = x.shape[-1] == self.out_channels
    if self.strides == 1 and same_width:
      return x
    if self.kind == "zero_pad":
      return _zero_pad_shortcut(x, self.out_channels, self.strides)
    if self.norm is None:
      if same_width:
        return _subsample(x, self.strides)
      return self.conv(self.out_channels, (1, 1), self.strides, padding=0,
                       name="conv")(x_preact)
    if self.kind == "avg_projection":
      x = self.conv(self.out_channels, (1, 1), padding=0,
                    name="conv")(_avg_pool_ceil(x, self.strides))
    else:
      x = self.conv(self.out_channels, (1, 1), self.strides, padding=0, name="conv")(x)
    return self.norm(name="bn")(x)


class SqueezeExcite(nn.Module):
  """Channel attention (Hu et al. 2018): global pool -> reduce -> ReLU -> expand -> sigmoid."""
  ratio: float
  conv: ModuleDef

  @nn.compact
  def __call__(self, y):
    channels = y.shape[-1]
    # In y's dtype (the BN output's, fp32), with a bias and flax's default init, as timm's.
    conv = functools.partial(self.conv, kernel_size=(1, 1), padding=0, use_bias=True,
                             kernel_init=nn.initializers.lecun_normal(), dtype=y.dtype)
    s = jnp.mean(y, axis=(1, 2), keepdims=True)
    s = nn.relu(conv(max(1, int(round(channels * self.ratio))), name="reduce")(s))
    s = nn.sigmoid(conv(channels, name="expand")(s))
    return y * s


def last_bn_scale_init(zero: bool):
  # Starting the branch's last BN scale at zero makes every block the identity at init
  # (Goyal et al. 2017), which helps very deep nets and large batches.
  return nn.initializers.zeros if zero else nn.initializers.ones


class ResidualBlock(nn.Module):
  """What every block shares. A subclass's `__call__` computes the branch from its input x
  and returns `self.join(branch, x)` (pre-activation blocks: `join(branch, x, x_preact)`).

  conv: flax `nn.Conv`'s signature, bias, init and dtypes already bound; norm: BatchNorm
  with its mode bound; the block passes names, sizes, strides and padding.
  """
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  se_ratio: float = 0.0          # > 0: squeeze-and-excitation on the branch
  drop_path_rate: float = 0.0    # stochastic depth: drop the whole branch per example
  train: bool = False
  expansion: ClassVar[int] = 1   # output channels = filters * expansion
  preact: ClassVar[bool] = False  # v2: the ResNet drops the stem's BN and adds a final one

  def join(self, y, x, x_preact=None):
    """Squeeze-excite and stochastic depth on the branch y, plus the shortcut of x. A
    post-activation block (v1) returns act(sum); a pre-activation one (v2) the bare sum,
    which the next block's BN-ReLU opens."""
    if self.se_ratio > 0:
      y = SqueezeExcite(self.se_ratio, self.conv, name="se")(y)
    if self.shortcut != "none":
      if self.drop_path_rate > 0:
        # Huang et al. 2016: survivors are scaled so the expectation is unchanged; uses
        # the "dropout" RNG stream.
        y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
            y, deterministic=not self.train)
      y = y + Shortcut(self.filters * self.expansion, self.strides, self.shortcut, self.conv,
                       None if self.preact else self.norm, name="shortcut")(x, x_preact)
    return y if self.preact else self.act(y)


class BasicBlock(ResidualBlock):
  """Two 3x3 convs (ResNet-18/34 and the CIFAR nets)."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
    y = self.norm(name="bn2", scale_init=last_bn_scale_init(self.zero_init_last_bn))(y)
    return self.join(y, x)


class BottleneckBlock(ResidualBlock):
  """1x1 reduce, 3x3, 1x1 expand (x4). v1.5: the stride sits in the 3x3 conv (torchvision);
  v1 (stride_in_1x1): in the first 1x1 conv (the original Caffe model, Keras).

  groups / width_per_group give ResNeXt (32 groups of 4) and Wide ResNet (width 128), with
  torchvision's rule: inner width = filters * width_per_group / 64 * groups.
  """
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  expansion: ClassVar[int] = 4

  @property
  def width(self) -> int:
    return int(self.filters * (self.width_per_group / 64.0)) * self.groups

  @property
  def strides_1x1_3x3(self) -> tuple[int, int]:
    return (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)

  @nn.compact
  def __call__(self, x):
    s1, s3 = self.strides_1x1_3x3
    y = self.conv(self.width, (1, 1), s1, padding=0, name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.width, (3, 3), s3, padding=1, feature_group_count=self.groups,
                  name="conv2")(y)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), padding=0, name="conv3")(y)
    y = self.norm(name="bn3", scale_init=last_bn_scale_init(self.zero_init_last_bn))(y)
    return self.join(y, x)


def _last_conv_init(zero: bool) -> dict:
  # No BN closes a v2 branch: zero-init its last conv instead, for the same identity start.
  return {"kernel_init": nn.initializers.zeros} if zero else {}


class PreActBasicBlock(BasicBlock):
  """v2 (He et al. 2016): BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut, no ReLU after.
  Also Wide ResNet's block (Zagoruyko & Komodakis 2016). Convs followed by a BN carry no
  bias; with conv_bias (Keras' ResNet50V2) the others -- the last conv and the projection --
  do."""
  preact: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x):
    x_preact = self.act(self.norm(name="bn1")(x))
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, use_bias=False,
                  name="conv1")(x_preact)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.filters, (3, 3), padding=1, name="conv2",
                  **_last_conv_init(self.zero_init_last_bn))(y)
    return self.join(y, x, x_preact)


class PreActBottleneckBlock(BottleneckBlock):
  """v2 bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (x4), plus the shortcut; biases as
  PreActBasicBlock's."""
  preact: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x):
    s1, s3 = self.strides_1x1_3x3
    x_preact = self.act(self.norm(name="bn1")(x))
    y = self.conv(self.width, (1, 1), s1, padding=0, use_bias=False, name="conv1")(x_preact)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.width, (3, 3), s3, padding=1, feature_group_count=self.groups,
                  use_bias=False, name="conv2")(y)
    y = self.act(self.norm(name="bn3")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), padding=0, name="conv3",
                  **_last_conv_init(self.zero_init_last_bn))(y)
    return self.join(y, x, x_preact)
