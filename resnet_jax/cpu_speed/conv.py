"""Convolutions as XLA:CPU runs them fastest: the primitive behind the CPU lowerings' `nn.Conv`.

flax's `nn.Conv` takes the function that convolves (`conv_general_dilated`, lax's signature);
`conv_general_dilated(lowering)` here is a drop-in for lax's. Parameters, shapes and results
are flax's own (to float32 rounding); only how XLA:CPU computes them differs:

  "onednn": float32 convolutions (forward, dx, dw) on oneDNN's CPU kernels through XLA's
            FFI (cpu_speed/kernels): PyTorch's CPU library, the fastest here by far
            (experiments/performance.md); needs a C++ compiler and the oneDNN wheels. Other
            dtypes take the "cpu" path below.
  "cpu":    XLA:CPU alone, as fast as it was measured to go: kxk convolutions on XLA's Eigen
            kernels rather than YNNPACK's (lowering.compiler_options), their weight gradient
            over a materialised input (`_spatial_bwd`), the dx of strided ones as stride-1
            convolutions per input phase (`_dx_by_phases`), and 1x1 convolutions as 2-D
            matrix products with a hand-written backward (`_pointwise`).

Grouped or dilated convolutions, and layouts other than NHWC/HWIO, go to lax unchanged.
Every path agrees with lax's to float32 rounding (tests/test_cpu_speed.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.cpu_speed import kernels

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _native(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _flat(x):
  """[N, H, W, C] -> [N*H*W, C] (free: NHWC is row-major)."""
  return x.reshape(-1, x.shape[-1])


def _dot(a, b):
  """[M, K] x [K, F] -> [M, F]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())))


def _dot_tn(a, b):
  """[M, C]^T x [M, F] -> [C, F]: a weight gradient, the sum over every output pixel."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def window_taps(xp, window, strides):
  """[((i, j), tap)] for every offset of a VALID window over NHWC `xp`, row-major: tap is
  the input pixel each output pixel meets at that offset, [N, Ho, Wo, C]."""
  (kh, kw), (sh, sw) = window, strides
  n, h, w, c = xp.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  return [((i, j), lax.slice(xp, (0, i, j, 0),
                             (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                             (1, sh, sw, 1)))
          for i in range(kh) for j in range(kw)]


def place_tap(part, offset, strides, hw):
  """The transpose of taking one tap: `part` [N, Ho, Wo, C] put back on the pixels it was
  read from in an [N, h, w, C] map (offset + stride * k), zeros everywhere else."""
  zero = jnp.zeros((), part.dtype)
  pads = [(o, size - o - (out - 1) * s - 1, s - 1)
          for o, s, size, out in zip(offset, strides, hw, part.shape[1:3])]
  return lax.pad(part, zero, [(0, 0, 0)] + pads + [(0, 0, 0)])


# --- 1x1 convolutions: matrix products on [pixels, channels] -----------------------------
# XLA:CPU runs a 1x1 convolution's backward as a general convolution with transposed
# operands (measured: dw of 56x56x64->256, batch 32, 10x slower than the 2-D product).
# Written as 2-D dots, forward, dx and dw are plain GEMMs. A strided 1x1 (projection
# shortcut) first picks the pixels it reads; its dx scatters back with interior padding.

def _pick(x, strides):
  sh, sw = strides
  return x if (sh, sw) == (1, 1) else x[:, ::sh, ::sw, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, kernel, strides):
  return _pointwise_fwd(x, kernel, strides)[0]


def _pointwise_fwd(x, kernel, strides):
  xs = _pick(x, strides)
  y = _dot(_flat(xs), kernel.reshape(kernel.shape[2:]))
  return y.reshape(xs.shape[:3] + (kernel.shape[-1],)), (x, kernel)


def _pointwise_bwd(strides, res, dy):
  x, kernel = res
  w2d = kernel.reshape(kernel.shape[2:])
  dy2d = _flat(dy)
  dw = _dot_tn(_flat(_pick(x, strides)), dy2d).reshape(kernel.shape)
  dxs = lax.dot_general(dy2d, w2d, (((1,), (1,)), ((), ()))).reshape(dy.shape[:3] + (-1,))
  if tuple(strides) != (1, 1):
    dxs = place_tap(dxs, (0, 0), strides, x.shape[1:3])
  return dxs, dw


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


# --- kxk convolutions: native forward and dw, strided dx by phases ----------------------
# The generic dx of a strided convolution is a convolution over dy dilated s-fold
# (lhs_dilation), which XLA:CPU runs on a slow path (in a ResNet-50 step: two of them ~0.45 s
# of ~6.5 s); `_dx_by_phases` does the same multiply-adds as s*s stride-1 convolutions.
# XLA computes dw over [C, H, W, N]-transposed copies of x and dy. Left alone, it fuses x's
# whole BN/ReLU producer chain into that transpose and recomputes it there with strided
# reads: 106 ms instead of 9.5 ms for one 56x56x64 activation of batch 32. A product with the
# identity matrix is a library call XLA does not fuse producers into, so the transpose reads
# a plain buffer; it is exact (x * 1 plus zeros) and costs 2k FLOPs per value for a k x k
# identity (k <= 64 at every ResNet width, see `_materialised`).
# (The same product on every residual block's output, against XLA recomputing the residual
# stream inside later fusions, measured no faster.)
# Tried and rejected, measured in full train steps: im2col / per-tap matrix products for
# the forward or dw (2-4x slower than XLA's own kxk convolution), optimization barriers
# (XLA:CPU removes them), a lax.cond to materialise activations (slower overall), and the
# same identity product on dy (slower on ResNet-18/50).


def _materialised(x):
  """x, computed into its own buffer by a matrix product with the identity (see above). Up
  to 64 channels the whole identity; wider, blocks of 16 channels when they divide the
  width: the fastest of the block sizes measured in ResNet-18/20 steps."""
  c = x.shape[-1]
  k = c if c <= 64 or c % 16 else 16
  y = lax.dot_general(x.reshape(-1, k), jnp.eye(k, dtype=x.dtype), (((1,), (0,)), ((), ())))
  return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _spatial(x, kernel, strides, padding):
  return _native(x, kernel, strides, padding)


def _spatial_fwd(x, kernel, strides, padding):
  return _native(x, kernel, strides, padding), (x, kernel)


def _spatial_bwd(strides, padding, res, dy):
  x, kernel = res
  xm = _materialised(x)
  _, vjp = jax.vjp(lambda k: _native(xm, k, strides, padding), kernel)
  (dw,) = vjp(dy)
  if tuple(strides) == (1, 1):
    _, vjp = jax.vjp(lambda x: _native(x, kernel, strides, padding), x)
    return vjp(dy)[0], dw
  return _dx_by_phases(dy, kernel, x.shape, strides, padding), dw


_spatial.defvjp(_spatial_fwd, _spatial_bwd)


def _phase(r, k, s, lo, size, out_size):
  """For input positions h = s*a + r of one dimension: (first tap i0, taps T, the lo/hi
  padding of dy that makes dx_r a stride-1 VALID correlation, and how many a there are)."""
  i0 = (r + lo) % s
  taps = max(0, -(-(k - i0) // s))
  count = -(-(size - r) // s)
  c = (r + lo - i0) // s
  pad_lo = taps - 1 - c
  return i0, taps, (pad_lo, count + taps - 1 - (out_size + pad_lo)), count


def _dx_by_phases(dy, kernel, x_shape, strides, padding):
  """dx of a strided convolution as s*s stride-1 convolutions, one per input phase.

  The input pixels with h % s == r only ever meet kernel taps i = i0, i0 + s, ...; so dx on
  them is a stride-1 correlation of dy with that sub-kernel (flipped, in/out swapped). The
  same multiply-adds as the transposed convolution, without its s*s-fold dilated input:
  XLA:CPU runs the lhs-dilated convolution of the generic transpose several times slower.
  """
  kh, kw, c, _ = kernel.shape
  (sh, sw), (n, h, w, _) = strides, x_shape
  # Every phase is padded to the first's size so they interleave by a reshape; crop after.
  full_h, full_w = -(-h // sh), -(-w // sw)
  rows = []
  for rh in range(sh):
    i0, th, pad_h, ah = _phase(rh, kh, sh, padding[0][0], h, dy.shape[1])
    row = []
    for rw in range(sw):
      j0, tw, pad_w, aw = _phase(rw, kw, sw, padding[1][0], w, dy.shape[2])
      if th == 0 or tw == 0:
        part = jnp.zeros((n, ah, aw, c), dy.dtype)
      else:
        sub = kernel[i0::sh, j0::sw][::-1, ::-1]            # [th, tw, C, F], flipped
        dyp = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), pad_h + (0,), pad_w + (0,),
                                                    (0, 0, 0)))
        part = _native(dyp, jnp.swapaxes(sub, 2, 3), (1, 1), ((0, 0), (0, 0)))
      row.append(jnp.pad(part, ((0, 0), (0, full_h - ah), (0, full_w - aw), (0, 0))))
    rows.append(jnp.stack(row, axis=3))                     # [N, A, B, sw, C]
  dx = jnp.stack(rows, axis=2)                              # [N, A, sh, B, sw, C]
  dx = dx.reshape(n, dx.shape[1] * sh, dx.shape[3] * sw, c)
  return dx[:, :h, :w]


def cpu_conv(x, kernel, strides, padding):
  """NHWC x HWIO convolution (no groups, no dilation) as XLA:CPU runs it fastest."""
  kh, kw = kernel.shape[:2]
  if kh == kw == 1 and all(tuple(p) == (0, 0) for p in padding):
    return _pointwise(x, kernel, tuple(strides))
  return _spatial(x, kernel, tuple(strides), tuple(tuple(p) for p in padding))


def _explicit_padding(padding, x_shape, kernel_hw, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], kernel_hw, strides, padding.upper()))
  return tuple(tuple(p) for p in padding)


def _is_nhwc_hwio(dimension_numbers, lhs, rhs) -> bool:
  if dimension_numbers is None or lhs.ndim != 4:
    return False
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == \
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)


def conv_general_dilated(lowering: str):
  """A `lax.conv_general_dilated` that runs the "cpu" or "onednn" lowering where it applies
  (2-D NHWC x HWIO, no groups, no dilation, default precision) and lax's elsewhere."""
  if lowering not in ("cpu", "onednn"):
    raise ValueError(f"unknown CPU lowering {lowering!r}; expected 'cpu' or 'onednn'")

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None):
    undilated = all(d == 1 for d in (lhs_dilation or ())) and all(
        d == 1 for d in (rhs_dilation or ()))
    if (undilated and feature_group_count == 1 and batch_group_count == 1
        and precision is None and preferred_element_type is None
        and _is_nhwc_hwio(dimension_numbers, lhs, rhs)):
      strides = tuple(window_strides)
      pads = _explicit_padding(padding, lhs.shape, rhs.shape[:2], strides)
      if lowering == "onednn" and lhs.dtype == rhs.dtype == jnp.float32:
        return kernels.conv2d(lhs, rhs, strides, pads)
      return cpu_conv(lhs, rhs, strides, pads)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  conv.__name__ = f"conv_general_dilated_{lowering}"
  return conv
