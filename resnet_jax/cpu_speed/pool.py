"""Max pooling for the CPU lowerings: a drop-in for `flax.linen.max_pool`.

"cpu": the maximum over the window's strided taps, with a custom gradient that sends each
output's gradient to the FIRST maximal input in row-major window order, exactly as XLA's
select-and-scatter with `>=` does. XLA:CPU lowers the generic gradient through a variadic
reduce-window over iota index planes; in a ResNet-50 train step (batch 32, 224) that cost
~0.5 s of a 6.7 s step, the taps version a few ms.
"onednn": the same rule in a float32 kernel (cpu_speed/kernels) whose forward records each
window's winner. Next to the oneDNN convolutions, XLA fused the taps gradient into nine
fusions over the padded 112x112x64 map, each recomputing the winners: 0.68 s of a 2.2 s
ResNet-18 step.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.cpu_speed import kernels
from resnet_jax.cpu_speed.conv import place_tap, window_taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_taps(x, window, strides):
  return functools.reduce(jnp.maximum, [t for _, t in window_taps(x, window, strides)])


def _fwd(x, window, strides):
  y = _max_pool_taps(x, window, strides)
  return y, (x, y)


def _bwd(window, strides, res, dy):
  x, y = res
  dx = jnp.zeros_like(x)
  taken = jnp.zeros(y.shape, bool)
  for offset, tap in window_taps(x, window, strides):
    first = (tap == y) & ~taken
    taken = taken | first
    dx = dx + place_tap(jnp.where(first, dy, 0), offset, strides, x.shape[1:3])
  return (dx,)


_max_pool_taps.defvjp(_fwd, _bwd)


def max_pool(lowering: str):
  """`flax.linen.max_pool(x, window_shape, strides, padding)` for NHWC maps, VALID padding
  through the lowering's own gradient (anything else through flax's)."""
  if lowering not in ("cpu", "onednn"):
    raise ValueError(f"unknown CPU lowering {lowering!r}; expected 'cpu' or 'onednn'")

  def pool(x, window_shape, strides=None, padding="VALID"):
    window = tuple(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * len(window)
    if padding != "VALID" or x.ndim != 4 or len(window) != 2:
      return nn.max_pool(x, window, strides=strides, padding=padding)
    if lowering == "onednn" and x.dtype == jnp.float32:
      return kernels.max_pool(x, window, strides)
    return _max_pool_taps(x, window, strides)

  pool.__name__ = f"max_pool_{lowering}"
  return pool
