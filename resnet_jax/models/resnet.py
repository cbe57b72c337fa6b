"""One parametric ResNet. Every named depth is a row in `registry.py`, not a class."""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models.batch_norm import BatchNorm
from resnet_jax.models.blocks import block_class

ModuleDef = Any

# He et al. initialise convs with fan-out normal (as torchvision does).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# The layers a ResNet is made of unless told otherwise: flax's conv and max pool, and our
# BatchNorm (flax's variables and math, plus ghost batches). A backend may pass faster ones
# with the same parameters (resnet_jax/lowering.py); the network code never knows.
DEFAULT_LAYERS = {"conv": nn.Conv, "norm": BatchNorm, "pool": nn.max_pool}


class ResNet(nn.Module):
  """Stem -> stages of residual blocks -> global average pool -> linear classifier.

  block: a `blocks.ResidualBlock` subclass (or a functools.partial of one): BasicBlock,
    BottleneckBlock, their pre-activation (v2) twins, or your own.
  stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "deep" (three 3x3 convs, stem_width,
    stem_width, 2*stem_width, then the max-pool: ResNet-D / timm's resnet50d) or "cifar"
    (one 3x3 conv, no pool).
  Flavours (see registry.py for the named rows):
    v1.5 (default, torchvision): stride in the bottleneck's 3x3 conv.
    v1 (Caffe / Keras ResNet50): BottleneckBlock(stride_in_1x1=True), conv_bias=True.
    D (timm resnet50d): stem="deep", stem_width=32, shortcut="avg_projection".
    v2 pre-activation (He et al. 2016, Keras ResNet50V2): a pre-activation block -- the
      stem then has no BN and one BN-ReLU closes the network; Keras places the stride in
      the *last* block of stages 1..n-1 (downsample_at="end").
  frozen_stages: parts ("stem", "stage1", ..., "final") whose BatchNorm stays in inference
    mode in training too (running statistics used and kept): fine-tuning with frozen layers.
  conv / norm / pool / act: the layers (DEFAULT_LAYERS, ReLU).
  num_classes=0 drops the classifier: the model returns pre-logits (a backbone).
  __call__(..., return_features=True) returns {"stem", "stage1".., "pre_logits", "logits"}
  (as timm's features_only / Keras' include_top=False, plus the rest).
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  block: ModuleDef
  num_classes: int
  stem: str = "imagenet"
  stem_width: int = 64
  shortcut: str = "projection"
  zero_init_last_bn: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_group_size: int = 0          # > 0: "ghost" BN over groups of this many examples
  frozen_stages: Sequence[str] = ()
  se_ratio: float = 0.0           # > 0: squeeze-and-excitation in every block
  drop_path_rate: float = 0.0     # stochastic depth, rising linearly to this at the last block
  conv_bias: bool = False         # Keras-style biases (v1: every conv; v2: see blocks.py)
  downsample_at: str = "start"    # "start" of stages 2..n, or "end" of stages 1..n-1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv: ModuleDef = DEFAULT_LAYERS["conv"]
  norm: ModuleDef = DEFAULT_LAYERS["norm"]
  pool: Callable = DEFAULT_LAYERS["pool"]
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    unknown = sorted(set(self.frozen_stages) - set(self.parts) | {"head"} & set(self.frozen_stages))
    if unknown:
      raise ValueError(f"frozen_stages: unknown part {unknown[0]!r}; this model has "
                       f"{', '.join(self.parts)}")
    conv = functools.partial(self.conv, use_bias=self.conv_bias, kernel_init=CONV_INIT,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    preact = block_class(self.block).preact
    features = {}
    x = x.astype(self.dtype)
    # In v2 the stem is a bare conv: the first block's BN-ReLU normalises its output.
    stem_act = (lambda y, name: y) if preact else (
        lambda y, name: self.act(self._norm("stem", train)(name=name)(y)))
    if self.stem == "imagenet":
      x = stem_act(conv(self.stem_width, (7, 7), 2, padding=3, name="stem_conv")(x), "stem_bn")
    elif self.stem == "deep":
      x = stem_act(conv(self.stem_width, (3, 3), 2, padding=1, name="stem_conv1")(x),
                   "stem_bn1")
      x = stem_act(conv(self.stem_width, (3, 3), padding=1, name="stem_conv2")(x), "stem_bn2")
      x = stem_act(conv(2 * self.stem_width, (3, 3), padding=1, name="stem_conv3")(x),
                   "stem_bn3")
    elif self.stem == "cifar":
      x = stem_act(conv(self.stem_width, (3, 3), padding=1, name="stem_conv")(x), "stem_bn")
    else:
      raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet', 'deep' or 'cifar'")
    features["stem"] = x              # before the pool (as timm's feature_info)
    if self.stem in ("imagenet", "deep"):
      # Zero padding, as Keras does: the same as -inf padding after a ReLU (v1), and what
      # Keras' v2 weights expect where the stem has no ReLU.
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = self.pool(x, (3, 3), strides=(2, 2))

    total_blocks, index = sum(self.stage_sizes), 0
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      stage = f"stage{i + 1}"
      for j in range(num_blocks):
        x = self.block(width, 2 if self._downsamples(i, j) else 1, conv=conv,
                       norm=self._norm(stage, train), act=self.act, shortcut=self.shortcut,
                       zero_init_last_bn=self.zero_init_last_bn, se_ratio=self.se_ratio,
                       drop_path_rate=self.drop_path_rate * index / max(total_blocks - 1, 1),
                       train=train, name=f"{stage}_block{j + 1}")(x)
        index += 1
      features[stage] = x

    if preact:
      x = self.act(self._norm("final", train)(name="final_bn")(x))
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

  def _norm(self, part: str, train: bool):
    """The BatchNorm of one part of the network ("stem", "stageN", "final"). Statistics
    are those of whatever batch the caller passes (under jit with a sharded batch: the
    global batch), in fp32 even when `dtype` is bf16; a frozen part uses its running ones."""
    options = {"group_size": self.bn_group_size} if self.bn_group_size else {}
    return functools.partial(
        self.norm, use_running_average=not train or part in self.frozen_stages,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=jnp.float32,
        param_dtype=self.param_dtype, **options)

  def _downsamples(self, stage: int, block: int) -> bool:
    last_stage = len(self.stage_sizes) - 1
    if self.downsample_at == "start":
      return stage > 0 and block == 0
    if self.downsample_at == "end":
      return stage < last_stage and block == self.stage_sizes[stage] - 1
    raise ValueError(f"unknown downsample_at {self.downsample_at!r}; expected 'start' or 'end'")

  @property
  def parts(self) -> tuple[str, ...]:
    """The model's parts in forward order: "stem", "stage1".."stageN", "final" (v2's BN) and
    "head" (when num_classes > 0); `frozen_stages` may name all but the head."""
    final = ("final",) if block_class(self.block).preact else ()
    head = ("head",) if self.num_classes > 0 else ()
    return (("stem",) + tuple(f"stage{i + 1}" for i in range(len(self.stage_sizes))) +
            final + head)
