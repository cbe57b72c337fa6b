"""Batch normalisation: `flax.linen.BatchNorm`'s parameters, statistics and math, with a
hand-written gradient for the CPU lowering.

Same variables as flax (params `scale`, `bias`; batch_stats `mean`, `var`), same momentum
update, same fast variance (E[x^2] - E[x]^2, clipped at 0) and the same expression for the
output, all in float32. Only the training-mode gradient differs in how it is computed:

  "native" lowering (GPU/TPU): JAX differentiates the forward expression, as for flax.
  "cpu" lowering (conv.py's "auto" on CPU): a custom VJP in the textbook closed form,
      dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)),   a = scale / sqrt(var + eps),
      which XLA:CPU turns into one reduction pass and one elementwise pass per layer. The
      autodiff graph of the forward expression leaves XLA:CPU several passes per layer and
      fusions that recompute earlier layers' normalisations (seen in ResNet-50 profiles).
Both give the same numbers to float32 rounding (tests/test_conv_lowering.py).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models import conv

_AXES = (0, 1, 2)   # NHWC: statistics over batch and space, per channel


def _stats(x):
  mean = jnp.mean(x, _AXES)
  var = jnp.maximum(jnp.mean(jnp.square(x), _AXES) - jnp.square(mean), 0.0)
  return mean, var


def _normalize(x, mean, var, scale, bias, epsilon):
  # flax's expression and order of operations.
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


def _train_autodiff(x, scale, bias, epsilon):
  mean, var = _stats(x)
  return _normalize(x, mean, var, scale, bias, epsilon), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _train_custom(x, scale, bias, epsilon):
  return _train_autodiff(x, scale, bias, epsilon)


def _train_fwd(x, scale, bias, epsilon):
  mean, var = _stats(x)
  y = _normalize(x, mean, var, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, var)


def _train_bwd(epsilon, res, cotangents):
  x, scale, mean, var = res
  dy, dmean, dvar = cotangents
  count = x.size // x.shape[-1]
  rstd = lax.rsqrt(var + epsilon)
  centred = x - mean
  sum_dy = jnp.sum(dy, _AXES)
  sum_dy_xhat = jnp.sum(dy * centred, _AXES) * rstd
  a = scale * rstd
  # dx = a*dy - a/M*sum_dy - a*xhat/M*sum_dy_xhat, plus the (usually zero) cotangents of
  # the returned batch statistics: d mean/dx = 1/M, d var/dx = 2 (x - mean)/M.
  coef_centred = (2.0 * dvar - a * rstd * sum_dy_xhat) / count
  const = (dmean - a * sum_dy) / count
  dx = a * dy + centred * coef_centred + const
  return dx, sum_dy_xhat, sum_dy


_train_custom.defvjp(_train_fwd, _train_bwd)


class BatchNorm(nn.Module):
  """Drop-in for the `flax.linen.BatchNorm` uses in this package (NHWC, channel axis -1)."""
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    out_dtype = self.dtype or jnp.result_type(x, scale, bias)
    x32 = x.astype(jnp.float32)
    scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if use_running_average:
      y = _normalize(x32, ra_mean.value, ra_var.value, scale32, bias32, self.epsilon)
      return y.astype(out_dtype)
    train = _train_custom if conv.resolve_impl() == "cpu" else _train_autodiff
    y, mean, var = train(x32, scale32, bias32, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)
