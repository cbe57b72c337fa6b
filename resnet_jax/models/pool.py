"""Max pooling (the ImageNet stem's 3x3/2), with the same backend-specific choice as conv.py.

"native": `flax.linen.max_pool` (reduce_window; its gradient is XLA's select-and-scatter).
"cpu": the maximum over the window's strided taps, with a custom gradient that sends each
output's gradient to the FIRST maximal input in row-major window order, exactly as
select-and-scatter with `>=` does. XLA:CPU lowers the generic gradient through a variadic
reduce-window over iota index planes; in a ResNet-50 train step (batch 32, 224) that cost
~0.5 s of a 6.7 s step, the taps version a few ms.
"onednn" (what conv.py's "auto" picks on CPU): the same rule in a float32 kernel of
resnet_jax/cpu_kernels whose forward records each window's winner. Next to the oneDNN
convolutions, XLA fused the taps gradient into nine fusions over the padded 112x112x64
map, each recomputing the winners: 0.68 s of a 2.2 s ResNet-18 step.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import cpu_kernels
from resnet_jax.models import conv


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_taps(x, window, strides):
  return functools.reduce(jnp.maximum, [t for _, t in conv.window_taps(x, window, strides)])


def _fwd(x, window, strides):
  y = _max_pool_taps(x, window, strides)
  return y, (x, y)


def _bwd(window, strides, res, dy):
  x, y = res
  dx = jnp.zeros_like(x)
  taken = jnp.zeros(y.shape, bool)
  for offset, tap in conv.window_taps(x, window, strides):
    first = (tap == y) & ~taken
    taken = taken | first
    dx = dx + conv.place_tap(jnp.where(first, dy, 0), offset, strides, x.shape[1:3])
  return (dx,)


_max_pool_taps.defvjp(_fwd, _bwd)


def max_pool(x, window=(3, 3), strides=(2, 2), impl: str | None = None):
  """VALID max pooling of NHWC `x` through the lowering conv.py selects."""
  impl = conv.resolve_impl(impl)
  if impl == "onednn" and x.dtype == jnp.float32:
    return cpu_kernels.max_pool(x, window, strides)
  if impl in conv.CPU_LOWERINGS:
    return _max_pool_taps(x, tuple(window), tuple(strides))
  return nn.max_pool(x, tuple(window), strides=tuple(strides))
