"""One parametric ResNet. Every named depth is a row in `registry.py`, not a class."""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models import blocks
from resnet_jax.models.conv import Conv
from resnet_jax.models.ghost_batch_norm import GhostBatchNorm

# He et al. initialise convs with fan-out normal (as torchvision does).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _symmetric_padding(kernel_size):
  # Torch-style k//2 padding on both sides. 'SAME' would pad (0, 1) for stride 2 on even
  # inputs and shift every feature map by half a pixel relative to torchvision.
  return [(k // 2, k // 2) for k in kernel_size]


class ResNet(nn.Module):
  """Stem -> stages of residual blocks -> global average pool -> linear classifier.

  stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (one 3x3 conv, no pool).
  num_classes=0 drops the classifier: the model returns pre-logits (a backbone).
  __call__(..., return_features=True) returns {"stem", "stage1".., "pre_logits", "logits"}
  (as timm's features_only / Keras' include_top=False, plus the rest).
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  block: str                      # "basic" | "bottleneck"
  num_classes: int
  stem: str = "imagenet"
  stem_width: int = 64
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_group_size: int = 0          # > 0: "ghost" BN over groups of this many examples
  groups: int = 1                 # bottleneck 3x3 conv groups (ResNeXt)
  width_per_group: int = 64       # bottleneck width rule (Wide ResNet: 128)
  se_ratio: float = 0.0           # > 0: squeeze-and-excitation in every block
  drop_path_rate: float = 0.0     # stochastic depth, rising linearly to this at the last block
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    def conv(features, kernel_size, strides=(1, 1), groups=1, name=None):
      return Conv(features, kernel_size, strides, padding=_symmetric_padding(kernel_size),
                     feature_group_count=groups, use_bias=False, kernel_init=CONV_INIT,
                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    # BN statistics are computed over whatever batch the caller passes; under jit with a
    # batch sharded over the mesh that is the *global* batch (XLA inserts the all-reduce).
    # With bn_group_size=G they are per group of G examples (see ghost_batch_norm.py).
    # BN itself runs in fp32 for stability even when `dtype` is bf16.
    if self.bn_group_size > 0:
      norm = functools.partial(GhostBatchNorm, self.bn_group_size)
    else:
      norm = nn.BatchNorm
    norm = functools.partial(norm, use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=jnp.float32,
                             param_dtype=self.param_dtype)
    if self.block == "basic":
      block_cls = blocks.BasicBlock
    elif self.block == "bottleneck":
      block_cls = functools.partial(blocks.BottleneckBlock, groups=self.groups,
                                    width_per_group=self.width_per_group)
    else:
      raise ValueError(f"unknown block {self.block!r}; expected 'basic' or 'bottleneck'")

    features = {}
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.stem_width, (7, 7), (2, 2), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      features["stem"] = x            # stride 2, before the pool (as timm's feature_info)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "cifar":
      x = conv(self.stem_width, (3, 3), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      features["stem"] = x
    else:
      raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet' or 'cifar'")

    total_blocks, index = sum(self.stage_sizes), 0
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(width, strides, conv=conv, norm=norm, act=nn.relu,
                      shortcut=self.shortcut, zero_init_last_bn=self.zero_init_last_bn,
                      se_ratio=self.se_ratio, train=train,
                      drop_path_rate=self.drop_path_rate * index / max(total_blocks - 1, 1),
                      name=f"stage{i + 1}_block{j + 1}")(x)
        index += 1
      features[f"stage{i + 1}"] = x

    x = jnp.mean(x, axis=(1, 2))
    features["pre_logits"] = x.astype(jnp.float32)
    if self.num_classes > 0:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head")(x)
      # Logits leave the model in fp32 so the loss and softmax never run in bf16.
      features["logits"] = x.astype(jnp.float32)
    if return_features:
      return features
    return features.get("logits", features["pre_logits"])
