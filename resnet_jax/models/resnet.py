"""One parametric ResNet. Every named depth is a row in `registry.py`, not a class."""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models import blocks
from resnet_jax.models import pool
from resnet_jax.models.batch_norm import BatchNorm
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

  stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "deep" (three 3x3 convs, stem_width,
    stem_width, 2*stem_width, then the max-pool: ResNet-D / timm's resnet50d) or "cifar"
    (one 3x3 conv, no pool).
  Flavours, each a field (see registry.py for the named rows):
    v1.5 (default, torchvision): stride in the bottleneck's 3x3 conv.
    v1 (Caffe / Keras ResNet50): stride_in_1x1=True, conv_bias=True.
    D (timm resnet50d): stem="deep", stem_width=32, shortcut="avg_projection".
    v2 pre-activation (He et al. 2016, Keras ResNet50V2): preact=True -- every block is
      BN-ReLU-conv, the stem has no BN, one BN-ReLU closes the network; Keras places the
      stride in the *last* block of stages 1..n-1 (downsample_at="end").
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
  preact: bool = False            # v2: pre-activation blocks
  stride_in_1x1: bool = False     # v1: the bottleneck's stride in its first 1x1 conv
  conv_bias: bool = False         # Keras-style biases (v1: every conv; v2: see blocks.py)
  downsample_at: str = "start"    # "start" of stages 2..n, or "end" of stages 1..n-1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    def conv(features, kernel_size, strides=(1, 1), groups=1, bias=None, kernel_init=None,
             name=None):
      # bias=None: the model's conv_bias; blocks pass False where BN follows in v2.
      return Conv(features, kernel_size, strides, padding=_symmetric_padding(kernel_size),
                  feature_group_count=groups,
                  use_bias=self.conv_bias if bias is None else bias,
                  kernel_init=kernel_init or CONV_INIT, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=name)

    # BN statistics are computed over whatever batch the caller passes; under jit with a
    # batch sharded over the mesh that is the *global* batch (XLA inserts the all-reduce).
    # With bn_group_size=G they are per group of G examples (see ghost_batch_norm.py).
    # BN itself runs in fp32 for stability even when `dtype` is bf16.
    if self.bn_group_size > 0:
      norm = functools.partial(GhostBatchNorm, self.bn_group_size)
    else:
      norm = BatchNorm
    norm = functools.partial(norm, use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=jnp.float32,
                             param_dtype=self.param_dtype)
    block_cls = _block_class(self.block, self.preact)
    if self.block == "bottleneck":
      block_cls = functools.partial(block_cls, groups=self.groups,
                                    width_per_group=self.width_per_group,
                                    stride_in_1x1=self.stride_in_1x1)

    features = {}
    x = x.astype(self.dtype)
    # In v2 the stem is a bare conv: the first block's BN-ReLU normalises its output.
    stem_act = (lambda y, name: y) if self.preact else (
        lambda y, name: nn.relu(norm(name=name)(y)))
    if self.stem == "imagenet":
      x = stem_act(conv(self.stem_width, (7, 7), (2, 2), name="stem_conv")(x), "stem_bn")
    elif self.stem == "deep":
      x = stem_act(conv(self.stem_width, (3, 3), (2, 2), name="stem_conv1")(x), "stem_bn1")
      x = stem_act(conv(self.stem_width, (3, 3), name="stem_conv2")(x), "stem_bn2")
      x = stem_act(conv(2 * self.stem_width, (3, 3), name="stem_conv3")(x), "stem_bn3")
    elif self.stem == "cifar":
      x = stem_act(conv(self.stem_width, (3, 3), name="stem_conv")(x), "stem_bn")
    else:
      raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet', 'deep' or 'cifar'")
    features["stem"] = x              # before the pool (as timm's feature_info)
    if self.stem in ("imagenet", "deep"):
      # Zero padding, as Keras does: the same as -inf padding after a ReLU (v1), and what
      # Keras' v2 weights expect where the stem has no ReLU.
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = pool.max_pool(x, (3, 3), (2, 2))

    total_blocks, index = sum(self.stage_sizes), 0
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for j in range(num_blocks):
        strides = 2 if self._downsamples(i, j) else 1
        x = block_cls(width, strides, conv=conv, norm=norm, act=nn.relu,
                      shortcut=self.shortcut, zero_init_last_bn=self.zero_init_last_bn,
                      se_ratio=self.se_ratio, train=train,
                      drop_path_rate=self.drop_path_rate * index / max(total_blocks - 1, 1),
                      name=f"stage{i + 1}_block{j + 1}")(x)
        index += 1
      features[f"stage{i + 1}"] = x

    if self.preact:
      x = nn.relu(norm(name="final_bn")(x))
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

  def _downsamples(self, stage: int, block: int) -> bool:
    last_stage = len(self.stage_sizes) - 1
    if self.downsample_at == "start":
      return stage > 0 and block == 0
    if self.downsample_at == "end":
      return stage < last_stage and block == self.stage_sizes[stage] - 1
    raise ValueError(f"unknown downsample_at {self.downsample_at!r}; expected 'start' or 'end'")


def _block_class(block: str, preact: bool):
  classes = {("basic", False): blocks.BasicBlock, ("bottleneck", False): blocks.BottleneckBlock,
             ("basic", True): blocks.PreActBasicBlock,
             ("bottleneck", True): blocks.PreActBottleneckBlock}
  if (block, preact) not in classes:
    raise ValueError(f"unknown block {block!r}; expected 'basic' or 'bottleneck'")
  return classes[block, preact]
