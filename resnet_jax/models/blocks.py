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
#   "none":       no shortcut at all -- the "plain" network of the paper's Fig. 4/6.
SHORTCUTS = ("projection", "zero_pad", "none")


def _zero_pad_shortcut(x, out_channels: int, strides: int):
  if strides > 1:
    x = x[:, ::strides, ::strides, :]
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
  def __call__(self, x):
    needs_change = self.strides != 1 or x.shape[-1] != self.out_channels
    if not needs_change:
      return x
    if self.kind == "zero_pad":
      return _zero_pad_shortcut(x, self.out_channels, self.strides)
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
  """1x1 reduce, 3x3, 1x1 expand (x4). v1.5: the stride sits in the 3x3 conv (torchvision).

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
  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = int(self.filters * (self.width_per_group / 64.0)) * self.groups
    y = self.conv(width, (1, 1), name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(width, (3, 3), (self.strides, self.strides), groups=self.groups,
                  name="conv2")(y)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=_last_bn_scale_init(self.zero_init_last_bn))(y)
    return _residual_out(self, y, x, self.filters * self.expansion)
