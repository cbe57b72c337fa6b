"""The CPU lowerings as resnet_jax/lowering.py asks for them: layers and compiler options.

"onednn": convolutions, BatchNorm sums and max pooling on native kernels (kernels/) with XLA
          fusing the rest; "cpu": XLA:CPU alone, arranged as it runs fastest. Both compute
          flax's numbers to float32 rounding (tests/test_cpu_speed.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.cpu_speed import kernels
from resnet_jax.cpu_speed.batch_norm import NORMALIZE_BATCH
from resnet_jax.cpu_speed.conv import conv_general_dilated
from resnet_jax.cpu_speed.pool import max_pool
from resnet_jax.models.batch_norm import BatchNorm

LOWERINGS = ("onednn", "cpu")

# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default. Its convolutions
# ran slower than XLA's own (Eigen) ones on every ResNet layer measured, its weight gradients
# 1.8-3x slower (56x56x64, batch 32: dw 59 vs 184 GFLOP/s); its dots stay much faster than
# Eigen's. So the CPU lowerings compile with YNNPACK for dots and reductions only.
_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def unavailable_reason(lowering: str) -> str | None:
  """None when `lowering` runs here, else one line saying why not."""
  if lowering == "onednn":
    return kernels.unavailable_reason()
  return None


def layers(lowering: str) -> dict:
  """`conv`, `norm` and `pool` for `models.create(...)`: flax's `nn.Conv` and our
  `BatchNorm` with this lowering's primitives, and its max pool."""
  if lowering not in LOWERINGS:
    raise ValueError(f"unknown CPU lowering {lowering!r}; expected one of {LOWERINGS}")
  return {"conv": functools.partial(nn.Conv,
                                    conv_general_dilated=conv_general_dilated(lowering)),
          "norm": functools.partial(BatchNorm, normalize_batch=NORMALIZE_BATCH[lowering]),
          "pool": max_pool(lowering)}


@functools.cache
def compiler_options() -> dict | None:
  """`jax.jit(..., compiler_options=...)` for the CPU lowerings, or None where this jaxlib
  rejects the (experimental) option: a rejected option would fail every compile, a missing
  one only costs speed."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_COMPILER_OPTIONS).lower(
        jnp.zeros((), jnp.float32)).compile()
  except Exception:  # noqa: BLE001 -- any rejection means "run without it"
    return None
  return dict(_COMPILER_OPTIONS)
