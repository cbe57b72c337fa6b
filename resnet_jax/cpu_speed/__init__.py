"""CPU speed: everything that makes XLA:CPU runs faster and nothing else needs.

Optional by design: delete this folder and every command still works, only slower on CPU
(the core's one seam, resnet_jax/lowering.py, then gives XLA's own convolutions). Nothing
in it is used on GPUs or TPUs.

  lowering.py   what the seam asks for: the layers (conv / norm / pool) of a CPU lowering
                ("onednn" or "cpu") and the XLA:CPU compiler options they were measured with
  conv.py, pool.py, batch_norm.py   those layers' primitives (flax's own modules take them)
  kernels/      oneDNN convolutions, BatchNorm sums and max pooling as XLA FFI kernels,
                compiled on first use
  allocator.py, buffer_reuse.c   glibc huge pages and big-buffer reuse for CPU-backend
                processes (set up by the entry points before JAX starts)
  native_build.py   compile-once-under-a-lock for the kernels and buffer_reuse.c

This __init__ imports nothing: allocator.py must load without JAX (before it starts, and in
the PyTorch peer's interpreter).
"""
