"""Native CPU kernels called from jitted JAX code through XLA's FFI.

XLA:CPU's own convolutions run at a fraction of what the CPU can do (experiments/
performance.md). This package gives the CPU lowering (`resnet_jax.models.conv`, impl
"onednn") two things XLA:CPU lacks:

  - convolutions (forward, dx, dw) on oneDNN, the library PyTorch's CPU convolutions use:
    `onednn_conv.cc`;
  - BatchNorm's per-channel sums in one pass over memory: `channel_sums.cc`;
  - max pooling whose gradient is one pass (the forward records each window's winner):
    `max_pool.cc`.

`library.py` compiles the C++ on first use (g++, cached per machine) and registers it;
`ops.py` wraps each kernel as a JAX op that XLA partitions along the batch like any other.
Where the kernels cannot run (no compiler, no oneDNN, not x86-64 Linux) `available()` is
False and `unavailable_reason()` says why; the models then use the XLA-only lowering.
"""

from resnet_jax.cpu_kernels.library import KernelsUnavailable, available, unavailable_reason
from resnet_jax.cpu_kernels.ops import centred_sums, channel_sums, conv2d, max_pool

__all__ = ["KernelsUnavailable", "available", "unavailable_reason", "centred_sums",
           "channel_sums", "conv2d", "max_pool"]
