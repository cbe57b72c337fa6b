"""Native CPU kernels called from jitted JAX code through XLA's FFI.

XLA:CPU's own convolutions run at a fraction of what the CPU can do (experiments/
performance.md). These kernels give the "onednn" lowering (cpu_speed/conv.py, pool.py,
batch_norm.py) what XLA:CPU lacks:

  - convolutions (forward, dx, dw) on oneDNN, the library PyTorch's CPU convolutions use:
    `onednn_conv.cc`;
  - BatchNorm's per-channel sums in one pass over memory: `channel_sums.cc`;
  - max pooling whose gradient is one pass (the forward records each window's winner):
    `max_pool.cc`.

`library.py` compiles the C++ on first use (g++, cached per machine) and registers it;
`ops.py` wraps each kernel as a JAX op that XLA partitions along the batch like any other.
Where the kernels cannot run (no compiler, no oneDNN, not x86-64 Linux) `available()` is
False and `unavailable_reason()` says why; "auto" then picks the XLA-only "cpu" lowering.
"""

from resnet_jax.cpu_speed.kernels.library import (KernelsUnavailable, available,
                                                  unavailable_reason)
from resnet_jax.cpu_speed.kernels.ops import centred_sums, channel_sums, conv2d, max_pool

__all__ = ["KernelsUnavailable", "available", "unavailable_reason", "centred_sums",
           "channel_sums", "conv2d", "max_pool"]
