"""`python -m resnet_jax.models [NAME ...] [--markdown | --names]`: every model with its
parameter count, its multiply-accumulates per image, and what it is proven equal to.

`--names` lists the names alone, at once (the full table traces every model: minutes);
`--markdown` prints the table docs/models.md holds.

MACs: "XLA" is XLA's cost analysis of the forward pass (it skips multiply-adds with zero
padding); "all" counts every conv/dense position (the convention of torchvision's published
GFLOPS). ImageNet models at 224x224 with 1000 classes, CIFAR models at 32x32 with 10.
"""

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.models import flops

# What each name is proven against, and where (tests/...): first matching pattern wins.
REFERENCES = [
    (r"resnet(50|101|152)_v[12]$", "Keras Applications: params + logits (test_keras_parity)"),
    (r"resnet(18|50|101)$|wide_resnet50_2|resnext50_32x4d",
     "torchvision: params (test_models) + logits (test_torchvision_parity)"),
    (r"resnet(34|152)$|wide_resnet101_2|resnext101", "torchvision: params (test_models)"),
    (r"resnet50d$|seresnet50$",
     "timm: params (test_models) + logits (test_torchvision_parity)"),
    (r"resnet200$|seresnet18$", "timm: params (test_models)"),
    (r"resnet\d+d$|seresnet", "timm's layout, as resnet50d / seresnet50"),
    (r"resnet\d+_v[12]$", "Keras' layout, as resnet50_v1 / resnet50_v2"),
    (r"resnet\d+_b$", "He et al. 2015 option B; counts pinned (test_models)"),
    (r"resnet(20|32|44|56|110|1202)$", "He et al. 2015, Table 6: params (test_models)"),
    (r"wide_resnet28_10$", "Zagoruyko & Komodakis 2016: 36.5M params (test_models)"),
    (r"plain", "its resnet twin minus the shortcuts (test_models)"),
    (r"wide_resnet\d+_\d+$", "as wide_resnet28_10"),
]


def reference(name: str) -> str:
  for pattern, text in REFERENCES:
    if re.match(pattern, name):
      return text
  return "same code path as its family"


def describe(name: str) -> dict:
  cifar = models.MODEL_SPECS[name]["stem"] == "cifar"
  num_classes, size = (10, 32) if cifar else (1000, 224)
  model = models.create(name, num_classes=num_classes)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, size, size, 3)))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  return dict(name=name, input=f"{size}x{size}", classes=num_classes, params=params,
              gmacs_xla=flops.xla_macs(model, size) / 1e9,
              gmacs_all=flops.analytic_macs(model, size) / 1e9, reference=reference(name))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("names", nargs="*", help="model names (default: all)")
  how = p.add_mutually_exclusive_group()
  how.add_argument("--markdown", action="store_true", help="print a markdown table")
  how.add_argument("--names", dest="names_only", action="store_true",
                   help="only the names, one per line (instant)")
  args = p.parse_args(argv)
  names = args.names or models.list_models()
  unknown = [n for n in names if n not in models.MODEL_SPECS]
  if unknown:
    print(f"models: error: unknown model {unknown[0]!r}; `python -m resnet_jax.models "
          "--names` lists them", file=sys.stderr)
    return 2
  if args.names_only:
    print("\n".join(names))
    return 0
  if args.markdown:
    print("| name | input | params | GMACs (XLA) | GMACs (all) | proven against |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
  for name in names:
    d = describe(name)
    if args.markdown:
      print(f"| {name} | {d['input']} | {d['params']:,} | {d['gmacs_xla']:.2f} | "
            f"{d['gmacs_all']:.2f} | {d['reference']} |")
    else:
      print(f"{name:20s} {d['input']:>8s} {d['params']:>12,d} params  "
            f"{d['gmacs_xla']:7.2f} GMACs (XLA)  {d['gmacs_all']:7.2f} (all)  {d['reference']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
