"""The convolution every ResNet layer uses, with a backend-specific lowering.

Parameters are exactly those of `flax.linen.Conv` (`kernel` in HWIO, `bias`), so checkpoints
and weight converters do not care which lowering ran. Only the computation differs:

  "native": `lax.conv_general_dilated` and its autodiff -- cuDNN / TPU convolutions.
  "onednn": float32 convolutions (forward, dx, dw) on oneDNN's CPU kernels through XLA's
            FFI, BatchNorm's batch sums and the max pool as one-pass kernels
            (resnet_jax/cpu_kernels), and the rest of the "cpu" lowering below around them.
            The fastest on CPU by far (experiments/performance.md); needs a C++ compiler
            and the oneDNN wheels.
  "cpu":    XLA:CPU alone, as fast as it was measured to go (see experiments/
            performance.md): kxk convolutions on XLA's Eigen kernels rather than YNNPACK's
            (`compiler_options()`, which every jit running a model passes), their weight
            gradient over a materialised input (`_spatial_bwd`), the dx of strided ones as
            stride-1 convolutions per input phase (`_dx_by_phases`), and 1x1 convolutions as
            2-D matrix products with a hand-written backward (`_pointwise`). batch_norm.py
            and pool.py follow the same switch.
  "auto":   on the CPU backend "onednn" where its kernels build here, else "cpu" (with a
            warning saying why); "native" on every other backend. The default.

Choose with `set_impl(...)`, the context manager `use_impl(...)` or the environment variable
RESNET_JAX_CONV_IMPL. The choice is read when a function is traced: a step already compiled
keeps the lowering it was traced with. Every lowering agrees with "native" to float32
rounding (tests/test_conv_lowering.py, tests/test_cpu_kernels.py).
"""

import contextlib
import functools
import os
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import cpu_kernels

IMPLS = ("auto", "native", "cpu", "onednn")
CPU_LOWERINGS = ("cpu", "onednn")   # the ones that run the "cpu" lowering's pieces
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_impl = os.environ.get("RESNET_JAX_CONV_IMPL", "auto")


def set_impl(name: str) -> None:
  global _impl
  if name not in IMPLS:
    raise ValueError(f"unknown conv impl {name!r}; expected one of {IMPLS}")
  _impl = name


def get_impl() -> str:
  return _impl


@contextlib.contextmanager
def use_impl(name: str):
  previous = get_impl()
  set_impl(name)
  try:
    yield
  finally:
    set_impl(previous)


@functools.cache
def _auto_cpu_impl() -> str:
  reason = cpu_kernels.unavailable_reason()
  if reason is None:
    return "onednn"
  warnings.warn(f"conv impl 'auto': the oneDNN CPU kernels are unavailable ({reason}); "
                "using the slower XLA-only 'cpu' lowering", RuntimeWarning, stacklevel=3)
  return "cpu"


def resolve_impl(impl: str | None = None) -> str:
  """"native", "cpu" or "onednn": what `impl` (default: the current setting) means now."""
  impl = impl or _impl
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; expected one of {IMPLS}")
  on_cpu = jax.default_backend() == "cpu"
  if impl == "auto":
    return _auto_cpu_impl() if on_cpu else "native"
  if impl == "onednn":
    if not on_cpu:
      raise ValueError(f"conv impl 'onednn' runs on the CPU backend only, not on "
                       f"{jax.default_backend()!r}; use 'auto' or 'native'")
    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
      raise cpu_kernels.KernelsUnavailable(f"conv impl 'onednn': {reason}")
  return impl


def cpu_lowering(impl: str | None = None) -> bool:
  """Whether `impl` means one of the CPU lowerings ("cpu" or "onednn")."""
  return resolve_impl(impl) in CPU_LOWERINGS


# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default. Its convolutions
# ran slower than XLA's own (Eigen) ones on every ResNet layer measured, its weight gradients
# 1.8-3x slower (56x56x64, batch 32: dw 59 vs 184 GFLOP/s); its dots stay much faster than
# Eigen's. So the "cpu" lowering compiles with YNNPACK for dots and reductions only.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_accepted() -> bool:
  """Whether this jaxlib knows the option (it is experimental): a rejected option would fail
  every compile, a missing one only costs speed."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(
        jnp.zeros((), jnp.float32)).compile()
    return True
  except Exception:  # noqa: BLE001 -- any rejection means "run without it"
    return False


def compiler_options(impl: str | None = None) -> dict | None:
  """`jax.jit(..., compiler_options=...)` for a function that runs these convolutions: the
  XLA:CPU settings the CPU lowerings were measured with, None for native/other backends."""
  if not cpu_lowering(impl) or jax.default_backend() != "cpu":
    return None
  return dict(_CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else None


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


def _explicit_padding(padding, x_shape, kernel_hw, strides, dilation):
  if isinstance(padding, str):
    padding = padding.upper()
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"conv padding {padding!r} not supported; use SAME, VALID or pairs")
    window = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    return tuple(lax.padtype_to_pads(x_shape[1:3], window, strides, padding))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def conv2d(x, kernel, strides=(1, 1), padding="SAME", *, feature_group_count: int = 1,
           kernel_dilation=(1, 1), precision=None, impl: str | None = None):
  """NHWC x HWIO 2-D convolution through the selected lowering."""
  strides, kernel_dilation = tuple(strides), tuple(kernel_dilation)
  padding = _explicit_padding(padding, x.shape, kernel.shape[:2], strides, kernel_dilation)
  lowerable = feature_group_count == 1 and kernel_dilation == (1, 1) and precision is None
  resolved = resolve_impl(impl)
  if resolved == "onednn" and lowerable and x.dtype == kernel.dtype == jnp.float32:
    return cpu_kernels.conv2d(x, kernel, strides, padding)
  if resolved in CPU_LOWERINGS and lowerable:
    return cpu_conv(x, kernel, strides, padding)
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=kernel_dilation,
                                  dimension_numbers=_DIMENSION_NUMBERS,
                                  feature_group_count=feature_group_count, precision=precision)


def _pair(v) -> tuple[int, int]:
  if v is None:
    return (1, 1)
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Module):
  """A drop-in for `flax.linen.Conv` on NHWC images (2-D kernels), same parameters."""
  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: Any = "SAME"
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel_hw = _pair(self.kernel_size)
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f"{in_features} input channels do not split into "
                       f"{self.feature_group_count} groups")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_hw + (in_features // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, _pair(self.strides), self.padding,
               feature_group_count=self.feature_group_count,
               kernel_dilation=_pair(self.kernel_dilation), precision=self.precision)
    if bias is not None:
      y = y + bias
    return y
