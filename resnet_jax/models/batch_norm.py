"""Batch normalisation: `flax.linen.BatchNorm`'s parameters, statistics and math, with a
hand-written gradient for the CPU lowering.

Same variables as flax (params `scale`, `bias`; batch_stats `mean`, `var`), same momentum
update, same fast variance (E[x^2] - E[x]^2, clipped at 0) and the same expression for the
output, all in float32. Only the training-mode gradient differs in how it is computed:

  "native" lowering (GPU/TPU): JAX differentiates the forward expression, as for flax.
  "cpu" lowering: a custom VJP in the textbook closed form,
      dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)),   a = scale / sqrt(var + eps),
      which XLA:CPU turns into one reduction pass and one elementwise pass per layer. The
      autodiff graph of the forward expression leaves XLA:CPU several passes per layer and
      fusions that recompute earlier layers' normalisations (seen in ResNet-50 profiles).
  "onednn" lowering (conv.py's "auto" on CPU): the same closed form, with the batch sums
      (sum x and sum x^2 forward; sum dy and sum dy * (x - mean) backward) computed by
      resnet_jax/cpu_kernels in one pass each. XLA's YNNPACK reductions wanted every
      operand in a buffer of its own, so it wrote `x - mean` out for every layer.
All give the same numbers to float32 rounding (tests/test_conv_lowering.py,
tests/test_cpu_kernels.py).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import cpu_kernels
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


def _xla_centred_sums(dy, x, mean):
  return jnp.sum(dy, _AXES), jnp.sum(dy * (x - mean), _AXES)


def _kernel_stats(x):
  # The same estimator as _stats, from sums: mean = S/M, var = max(Q/M - mean^2, 0).
  total, total_sq = cpu_kernels.channel_sums(x)
  count = x.size // x.shape[-1]
  mean = total / count
  return mean, jnp.maximum(total_sq / count - jnp.square(mean), 0.0)


def _closed_form(stats, centred_sums):
  """Training-mode BN (y, batch mean, batch var) with the closed-form gradient, its batch
  statistics from `stats(x)` and the backward's sums from `centred_sums(dy, x, mean)`."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def train(x, scale, bias, epsilon):
    return train_fwd(x, scale, bias, epsilon)[0]

  def train_fwd(x, scale, bias, epsilon):
    mean, var = stats(x)
    y = _normalize(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)

  def train_bwd(epsilon, res, cotangents):
    x, scale, mean, var = res
    dy, dmean, dvar = cotangents
    count = x.size // x.shape[-1]
    rstd = lax.rsqrt(var + epsilon)
    sum_dy, sum_dy_centred = centred_sums(dy, x, mean)
    sum_dy_xhat = sum_dy_centred * rstd
    a = scale * rstd
    # dx = a*dy - a/M*sum_dy - a*xhat/M*sum_dy_xhat, plus the (usually zero) cotangents of
    # the returned batch statistics: d mean/dx = 1/M, d var/dx = 2 (x - mean)/M.
    coef_centred = (2.0 * dvar - a * rstd * sum_dy_xhat) / count
    const = (dmean - a * sum_dy) / count
    dx = a * dy + (x - mean) * coef_centred + const
    return dx, sum_dy_xhat, sum_dy

  train.defvjp(train_fwd, train_bwd)
  return train


_TRAIN = {"cpu": _closed_form(_stats, _xla_centred_sums),
          "onednn": _closed_form(_kernel_stats, cpu_kernels.centred_sums)}


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
    train = _TRAIN.get(conv.resolve_impl(), _train_autodiff)
    y, mean, var = train(x32, scale32, bias32, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)
