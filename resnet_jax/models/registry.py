"""Named members of the family: each is one row of keyword arguments for `ResNet`."""

import functools
import re
from typing import Any

import jax.numpy as jnp

from resnet_jax.models.blocks import (BasicBlock, BottleneckBlock, PreActBasicBlock,
                                      PreActBottleneckBlock, block_class)
from resnet_jax.models.resnet import ResNet

_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

# ImageNet-style, v1.5 (stride in the 3x3 conv of the bottleneck), as torchvision.
_IMAGENET_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
    101: (BottleneckBlock, (3, 4, 23, 3)),
    152: (BottleneckBlock, (3, 8, 36, 3)),
    200: (BottleneckBlock, (3, 24, 36, 3)),
}
_PREACT = {BasicBlock: PreActBasicBlock, BottleneckBlock: PreActBottleneckBlock}

# The CIFAR nets of He et al. 2015 (Sec. 4.2): 6n+2 layers, three stages of n basic blocks
# with 16/32/64 filters, option-A (zero-padded identity) shortcuts. n=1 (resnet8) is the
# smallest member, used for fast tests.
_CIFAR_N = {8: 1, 20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 1202: 200}

MODEL_SPECS: dict[str, dict[str, Any]] = {}
for _depth, (_block, _sizes) in _IMAGENET_DEPTHS.items():
  MODEL_SPECS[f"resnet{_depth}"] = dict(stage_sizes=_sizes, stage_widths=_IMAGENET_WIDTHS,
                                        block=_block, stem="imagenet", stem_width=64,
                                        shortcut="projection")
for _depth, _n in _CIFAR_N.items():
  MODEL_SPECS[f"resnet{_depth}"] = dict(stage_sizes=(_n, _n, _n), stage_widths=_CIFAR_WIDTHS,
                                        block=BasicBlock, stem="cifar", stem_width=16,
                                        shortcut="zero_pad")

# The other flavours of every ImageNet depth (see resnet.py's docstring):
#   resnetN_v1: the original (Caffe) model as Keras ships it -- stride in the first 1x1,
#               a bias on every conv, Keras' BN epsilon.
#   resnetNd:   ResNet-D (timm's resnet50d): deep 32-32-64 stem, average-pool shortcut.
#   resnetN_v2: pre-activation (He et al. 2016) exactly as Keras' ResNet50V2: biases where
#               no BN follows, stride in the last block of stages 1-3.
_KERAS_BN_EPSILON = 1.001e-5
for _depth in _IMAGENET_DEPTHS:
  _v15 = MODEL_SPECS[f"resnet{_depth}"]
  _block = _v15["block"]
  MODEL_SPECS[f"resnet{_depth}_v1"] = dict(
      _v15, conv_bias=True, bn_epsilon=_KERAS_BN_EPSILON,
      block=functools.partial(_block, stride_in_1x1=True) if _block is BottleneckBlock
      else _block)
  MODEL_SPECS[f"resnet{_depth}d"] = dict(_v15, stem="deep", stem_width=32,
                                         shortcut="avg_projection")
  MODEL_SPECS[f"resnet{_depth}_v2"] = dict(_v15, block=_PREACT[_block], conv_bias=True,
                                           downsample_at="end", bn_epsilon=_KERAS_BN_EPSILON)

# The paper's CIFAR nets with option-B shortcuts (projection where the width grows).
for _depth in _CIFAR_N:
  MODEL_SPECS[f"resnet{_depth}_b"] = dict(MODEL_SPECS[f"resnet{_depth}"], shortcut="projection")

# CIFAR Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k is a pre-activation net of
# (d-4)/6 basic blocks per stage, widths 16k/32k/64k, 1x1-conv shortcuts where shapes change.
for _depth, _k in ((16, 8), (28, 10), (40, 4)):
  _n = (_depth - 4) // 6
  MODEL_SPECS[f"wide_resnet{_depth}_{_k}"] = dict(
      stage_sizes=(_n, _n, _n), stage_widths=tuple(w * _k for w in _CIFAR_WIDTHS),
      block=PreActBasicBlock, stem="cifar", stem_width=16, shortcut="projection")

# Wide ResNet (Zagoruyko & Komodakis; torchvision's ImageNet variants) and ResNeXt
# (Xie et al.): the same bottleneck stages with a wider or grouped 3x3 conv.
for _name, _depth, _groups, _width in (("wide_resnet50_2", 50, 1, 128),
                                       ("wide_resnet101_2", 101, 1, 128),
                                       ("resnext50_32x4d", 50, 32, 4),
                                       ("resnext101_32x8d", 101, 32, 8),
                                       ("resnext101_64x4d", 101, 64, 4)):
  MODEL_SPECS[_name] = dict(MODEL_SPECS[f"resnet{_depth}"], block=functools.partial(
      BottleneckBlock, groups=_groups, width_per_group=_width))

# Squeeze-and-excitation ResNets (timm's seresnet*: SE with ratio 1/16 in every block).
for _depth in _IMAGENET_DEPTHS:
  MODEL_SPECS[f"seresnet{_depth}"] = dict(MODEL_SPECS[f"resnet{_depth}"], se_ratio=1 / 16)

# Plain twins: every ResNet above with its shortcuts removed -- the "plain" networks of the
# paper's Fig. 4 and 6, for the degradation experiments (plain18, plain34, plain20, ...).
for _name in [n for n in MODEL_SPECS if n.startswith("resnet") and n[6:].isdigit()]:
  MODEL_SPECS["plain" + _name[len("resnet"):]] = dict(MODEL_SPECS[_name], shortcut="none")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def list_models() -> list[str]:
  """Every registered name, in natural order (resnet8 < resnet20 < resnet110)."""
  return sorted(MODEL_SPECS, key=lambda n: [int(t) if t.isdigit() else t
                                            for t in re.split(r"(\d+)", n)])


def register(name: str, **row) -> None:
  """Add a named model: `row` is ResNet's keyword arguments but num_classes and dtype, e.g.
  `register("mynet20", **dict(MODEL_SPECS["resnet20"], block=MyBlock))`. Then
  `create("mynet20", ...)` and `--config.model.name=mynet20` (in the same process) build it."""
  missing = {"stage_sizes", "stage_widths", "block"} - set(row)
  if missing:
    raise ValueError(f"model row {name!r} lacks {', '.join(sorted(missing))}")
  MODEL_SPECS[name] = row


def is_preact(name: str) -> bool:
  """Whether the named model is pre-activation (v2, the CIFAR Wide ResNets)."""
  return block_class(MODEL_SPECS[name]["block"]).preact


def part_of(name: str) -> str:
  """The part a top-level module belongs to: "stem" (stem_conv, stem_bn, stem_conv2, ...),
  "stageN" (stageN_blockM), "final" (v2's final_bn) or "head"; what model.frozen,
  optimizer.lr_multipliers and the per-stage gradient norms name."""
  if name.startswith("stem"):
    return "stem"
  if name.startswith("stage"):
    return name.split("_")[0]
  return "final" if name == "final_bn" else name


def expand_parts(parts, model_parts) -> set[str]:
  """`parts` ("body" = every part but the head) as a set of the model's parts; ValueError
  naming an unknown one."""
  out = set()
  for part in parts:
    if part == "body":
      out |= {p for p in model_parts if p != "head"}
    elif part in model_parts:
      out.add(part)
    else:
      raise ValueError(f"unknown part {part!r}; this model has {', '.join(model_parts)} "
                       "(and 'body': all but the head)")
  return out


def create(name: str, num_classes: int, dtype: str | Any = "float32", **overrides) -> ResNet:
  """Build a named model, e.g. `create("resnet50", num_classes=1000, dtype="bfloat16")`.

  `overrides` replace fields of the named row (e.g. `shortcut="projection"`,
  `zero_init_last_bn=True`) or set the layers (`conv`, `norm`, `pool`: see
  resnet_jax/lowering.py).
  """
  if name not in MODEL_SPECS:
    raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype]
  kwargs = dict(MODEL_SPECS[name], **overrides)
  return ResNet(num_classes=num_classes, dtype=dtype, **kwargs)
