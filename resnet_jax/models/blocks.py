"""Residual blocks. A block receives its conv/norm/act as ready-made partials, so the body
only says how layers are wired; the same body serves every depth and flavour."""

from typing import Any, Callable

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


def _subsample(x, strides: int):
  return x[:, ::strides, ::strides, :] if strides > 1 else x


def _avg_pool_ceil(x, strides: int):
  """torch's AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)."""
  if strides == 1:
    return x
  pad = [(0, 0)] + [(0, (-d) % strides) for d in x.shape[1:3]] + [(0, 0)]
  return nn.avg_pool(x, (strides, strides), strides=(strides, strides), padding=pad[1:3],
                     count_include_pad=False)


def _zero_pad_shortcut(x, out_channels: int, strides: int):
  x = _subsample(x, strides)
  extra = out_channels - x.shape[-1]
  if extra > 0:
    # Split the padding on both sides as in the reference CIFAR implementations.
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class SqueezeExcite(nn.Module):
  """Channel attention (Hu et al. 2018): global pool -> reduce -> ReLU -> expand -> sigmoid."""
  ratio: float
  conv: ModuleDef

  @nn.compact
  def __call__(self, y):
    channels = y.shape[-1]
    s = jnp.mean(y, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Conv(max(1, int(round(channels * self.ratio))), (1, 1), dtype=y.dtype,
                        name="reduce")(s))
    s = nn.sigmoid(nn.Conv(channels, (1, 1), dtype=y.dtype, name="expand")(s))
    return y * s


def _residual_out(block, y, x, out_channels):
  """Squeeze-excite and stochastic depth on the branch, then add the shortcut and ReLU."""
  if block.se_ratio > 0:
    y = SqueezeExcite(block.se_ratio, block.conv, name="se")(y)
  if block.shortcut == "none":
    return block.act(y)
  if block.drop_path_rate > 0:
    # Stochastic depth (Huang et al. 2016): drop the whole branch per example in training,
    # scaling survivors so the expectation is unchanged; uses the "dropout" RNG stream.
    y = nn.Dropout(block.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
        y, deterministic=not block.train)
  return block.act(y + Shortcut(out_channels, block.strides, block.shortcut, block.conv,
                                block.norm, name="shortcut")(x))


def _preact_residual_out(block, y, x, x_preact, out_channels):
  """v2: the sum is the block's output, un-activated (the next block's BN-ReLU follows)."""
  if block.se_ratio > 0:
    y = SqueezeExcite(block.se_ratio, block.conv, name="se")(y)
  if block.shortcut == "none":
    return y
  if block.drop_path_rate > 0:
    y = nn.Dropout(block.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
        y, deterministic=not block.train)
  return y + Shortcut(out_channels, block.strides, block.shortcut, block.conv, None,
                      name="shortcut")(x, x_preact)


def _last_bn_scale_init(zero: bool):
  # Starting the branch's last BN scale at zero makes every block the identity at init
  # (Goyal et al. 2017), which helps very deep nets and large batches.
  return nn.initializers.zeros if zero else nn.initializers.ones


class Shortcut(nn.Module):
  """The identity path of a residual block, matched to the branch's output shape."""
  out_channels: int
  strides: int
  kind: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, x_preact=None):
    """x_preact: the block's BN-ReLU'd input in v2 blocks (self.norm is then None)."""
    same_width = x.shape[-1] == self.out_channels
    if self.strides == 1 and same_width:
      return x
    if self.kind == "zero_pad":
      return _zero_pad_shortcut(x, self.out_channels, self.strides)
    if self.norm is None:               # pre-activation
      if same_width:
        return _subsample(x, self.strides)
      return self.conv(self.out_channels, (1, 1), (self.strides, self.strides),
                       name="conv")(x_preact)
    if self.kind == "avg_projection":
      x = self.conv(self.out_channels, (1, 1), name="conv")(_avg_pool_ceil(x, self.strides))
    else:
      x = self.conv(self.out_channels, (1, 1), (self.strides, self.strides), name="conv")(x)
    return self.norm(name="bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34 and the CIFAR nets)."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  se_ratio: float = 0.0
  drop_path_rate: float = 0.0
  train: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    y = self.norm(name="bn2", scale_init=_last_bn_scale_init(self.zero_init_last_bn))(y)
    return _residual_out(self, y, x, self.filters)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4). v1.5: the stride sits in the 3x3 conv (torchvision);
  v1 (stride_in_1x1): in the first 1x1 conv (the original Caffe model, Keras).

  groups / width_per_group give ResNeXt (32 groups of 4) and Wide ResNet (width 128), with
  torchvision's rule: inner width = filters * width_per_group / 64 * groups.
  """
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  se_ratio: float = 0.0
  drop_path_rate: float = 0.0
  train: bool = False
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = _bottleneck_width(self)
    s1, s3 = _bottleneck_strides(self)
    y = self.conv(width, (1, 1), s1, name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(width, (3, 3), s3, groups=self.groups, name="conv2")(y)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=_last_bn_scale_init(self.zero_init_last_bn))(y)
    return _residual_out(self, y, x, self.filters * self.expansion)


def _bottleneck_width(block) -> int:
  return int(block.filters * (block.width_per_group / 64.0)) * block.groups


def _bottleneck_strides(block):
  """(stride of the first 1x1, stride of the 3x3)."""
  s = (block.strides, block.strides)
  return (s, (1, 1)) if block.stride_in_1x1 else ((1, 1), s)


def _last_conv_init(zero: bool):
  # No BN closes a v2 branch: zero-init its last conv instead, for the same identity start.
  return nn.initializers.zeros if zero else None


class PreActBasicBlock(nn.Module):
  """v2 (He et al. 2016): BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut, no ReLU after.
  Also Wide ResNet's block (Zagoruyko & Komodakis 2016)."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  se_ratio: float = 0.0
  drop_path_rate: float = 0.0
  train: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x):
    x_preact = self.act(self.norm(name="bn1")(x))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), bias=False,
                  name="conv1")(x_preact)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.filters, (3, 3), kernel_init=_last_conv_init(self.zero_init_last_bn),
                  name="conv2")(y)
    return _preact_residual_out(self, y, x, x_preact, self.filters)


class PreActBottleneckBlock(nn.Module):
  """v2 bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (x4), plus the shortcut.

  Convs followed by a BN carry no bias; with conv_bias (Keras ResNet50V2) the others -- the
  last 1x1 and the projection -- do.
  """
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  se_ratio: float = 0.0
  drop_path_rate: float = 0.0
  train: bool = False
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = _bottleneck_width(self)
    s1, s3 = _bottleneck_strides(self)
    x_preact = self.act(self.norm(name="bn1")(x))
    y = self.conv(width, (1, 1), s1, bias=False, name="conv1")(x_preact)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(width, (3, 3), s3, groups=self.groups, bias=False, name="conv2")(y)
    y = self.act(self.norm(name="bn3")(y))
    y = self.conv(self.filters * self.expansion, (1, 1),
                  kernel_init=_last_conv_init(self.zero_init_last_bn), name="conv3")(y)
    return _preact_residual_out(self, y, x, x_preact, self.filters * self.expansion)
