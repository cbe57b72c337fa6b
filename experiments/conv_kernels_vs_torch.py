"""Our oneDNN convolution kernels against PyTorch's, layer by layer, interleaved in one process.

The "onednn" CPU lowering calls oneDNN 3.2 (the onednn-cpu-gomp wheel) through XLA's FFI;
PyTorch 2.13 links its own oneDNN 3.12. This times, for the convolution shapes of
ResNet-18/50 (batch 32, 224px) and CIFAR ResNet-20 (batch 128), the forward, dx and dw of
ours (each a jitted call of resnet_jax.cpu_speed.kernels) and PyTorch's (F.conv2d and
aten.convolution_backward on channels_last tensors) alternately, over several distinct
inputs so that neither side runs from a warm cache a train step would not have. It prints
per-shape medians (ms) and the time ratio ours/PyTorch of forward + backward (below 1:
ours is faster).

Needs torch and jax in the same interpreter (plus numpy), and the project on the path:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy jax==0.10.2
  ./launch.sh setup    # the project's .venv holds the oneDNN wheels and builds the kernels
  RESNET_JAX_ONEDNN_ROOT=.venv PYTHONPATH=. /tmp/torchvenv/bin/python \\
      experiments/conv_kernels_vs_torch.py [--repeats 4] [--inputs 6]
"""

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (batch, size, in channels, out channels, kernel, stride): every distinct 3x3/7x7 shape
# of ResNet-18 and -20 and the 1x1s of ResNet-50.
SHAPES = [(32, 224, 3, 64, 7, 2), (32, 56, 64, 64, 3, 1), (32, 28, 128, 128, 3, 1),
          (32, 14, 256, 256, 3, 1), (32, 7, 512, 512, 3, 1), (32, 56, 64, 128, 3, 2),
          (32, 56, 64, 256, 1, 1), (32, 56, 256, 64, 1, 1), (32, 14, 1024, 256, 1, 1),
          (128, 32, 16, 16, 3, 1), (128, 16, 32, 32, 3, 1), (128, 8, 64, 64, 3, 1)]


def _median_ms(times):
  return float(np.median(times)) * 1e3


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=4, help="passes over the inputs")
  p.add_argument("--inputs", type=int, default=6, help="distinct inputs per shape")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  from resnet_jax.cpu_speed.kernels import ops
  torch.set_num_threads(os.cpu_count())

  print(f"jax {jax.__version__} (oneDNN 3.2 via resnet_jax.cpu_speed.kernels) vs torch "
        f"{torch.__version__}, {os.cpu_count()} threads; ms, median of "
        f"{args.repeats * args.inputs}")
  print(f"{'shape':<26} {'ours fwd':>8} {'dx':>7} {'dw':>7} {'torch fwd':>9} {'dx+dw':>7} "
        f"{'time ratio':>10}")
  total_ours = total_torch = 0.0
  for n, size, c, f, k, s in SHAPES:
    pad = k // 2
    out = (size + 2 * pad - k) // s + 1
    rng = np.random.default_rng(0)
    xs = [rng.random((n, size, size, c), np.float32) for _ in range(args.inputs)]
    gs = [rng.random((n, out, out, f), np.float32) for _ in range(args.inputs)]
    w = rng.random((k, k, c, f), np.float32)
    forward, backward_data, backward_weights = ops._conv_ops(
        ((s, s), ((pad, pad), (pad, pad)), (size, size), (k, k)))
    ours = {"fwd": (jax.jit(lambda x, w: forward(x, w)[0]), lambda i: (jxs[i], jw)),
            "dx": (jax.jit(lambda g, w: backward_data(g, w)[0]), lambda i: (jgs[i], jw)),
            "dw": (jax.jit(lambda x, g: backward_weights(x, g)[0]), lambda i: (jxs[i], jgs[i]))}
    jxs, jgs, jw = [jnp.asarray(x) for x in xs], [jnp.asarray(g) for g in gs], jnp.asarray(w)
    # NHWC arrays seen as NCHW tensors are exactly channels_last.
    txs = [torch.from_numpy(x).permute(0, 3, 1, 2) for x in xs]
    tgs = [torch.from_numpy(g).permute(0, 3, 1, 2) for g in gs]
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).contiguous(
        memory_format=torch.channels_last)
    theirs = {
        "fwd": lambda i: torch.nn.functional.conv2d(txs[i], tw, None, s, pad),
        "bwd": lambda i: torch.ops.aten.convolution_backward(
            tgs[i], txs[i], tw, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
            [True, True, False])}
    for fn, operands in ours.values():       # compile and build the primitives
      jax.block_until_ready(fn(*operands(0)))
    times = {name: [] for name in [*ours, "torch fwd", "torch bwd"]}
    for _ in range(args.repeats):
      for i in range(args.inputs):
        for name, (fn, operands) in ours.items():
          a = operands(i)
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*a))
          times[name].append(time.perf_counter() - t0)
        for name, fn in theirs.items():
          t0 = time.perf_counter()
          fn(i)
          times[f"torch {name}"].append(time.perf_counter() - t0)
    m = {name: _median_ms(v) for name, v in times.items()}
    ours_ms = m["fwd"] + m["dx"] + m["dw"]
    torch_ms = m["torch fwd"] + m["torch bwd"]
    total_ours, total_torch = total_ours + ours_ms, total_torch + torch_ms
    label = f"{n}x{size}x{size} {c}->{f} {k}x{k}/{s}"
    print(f"{label:<26} {m['fwd']:>8.2f} {m['dx']:>7.2f} {m['dw']:>7.2f} "
          f"{m['torch fwd']:>9.2f} {m['torch bwd']:>7.2f} {ours_ms / torch_ms:>9.2f}x")
  print(f"{'all shapes':<26} {total_ours:>24.1f} {total_torch:>17.1f} "
        f"{total_ours / total_torch:>9.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
