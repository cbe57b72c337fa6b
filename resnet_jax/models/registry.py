"""Named members of the family: each is one row of keyword arguments for `ResNet`."""

from typing import Any

import jax.numpy as jnp

from resnet_jax.models.resnet import ResNet

_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

# ImageNet-style, v1.5 (stride in the 3x3 conv of the bottleneck), as torchvision.
_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

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
                                        block="basic", stem="cifar", stem_width=16,
                                        shortcut="zero_pad")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def list_models() -> list[str]:
  return sorted(MODEL_SPECS, key=lambda n: (MODEL_SPECS[n]["stem"], int(n[len("resnet"):])))


def create(name: str, num_classes: int, dtype: str | Any = "float32", **overrides) -> ResNet:
  """Build a named model, e.g. `create("resnet50", num_classes=1000, dtype="bfloat16")`.

  `overrides` replace fields of the named row (e.g. `shortcut="projection"`,
  `zero_init_last_bn=True`).
  """
  if name not in MODEL_SPECS:
    raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype]
  kwargs = dict(MODEL_SPECS[name], **overrides)
  return ResNet(num_classes=num_classes, dtype=dtype, **kwargs)


