"""BatchNorm's training-mode math for the CPU lowerings: `normalize_batch` functions for
`resnet_jax.models.batch_norm.BatchNorm`, the same numbers as its default to float32 rounding.

The forward is the default's (flax's statistics and expression); the gradient is written out
in the textbook closed form,
    dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)),   a = scale / sqrt(var + eps),
which XLA:CPU turns into one reduction pass and one elementwise pass per layer. The autodiff
graph of the forward leaves XLA:CPU several passes per layer and fusions that recompute
earlier layers' normalisations (seen in ResNet-50 profiles).

  "cpu":    the sums by XLA.
  "onednn": the batch sums (sum x and sum x^2 forward; sum dy and sum dy * (x - mean)
            backward) by cpu_speed/kernels in one pass each. XLA's YNNPACK reductions wanted
            every operand in a buffer of its own, so it wrote `x - mean` out for every layer.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.cpu_speed import kernels
from resnet_jax.models.batch_norm import batch_statistics, normalize


def _xla_centred_sums(dy, x, mean):
  axes = tuple(range(x.ndim - 1))
  return jnp.sum(dy, axes), jnp.sum(dy * (x - mean), axes)


def _kernel_statistics(x):
  # The same estimator as batch_statistics, from sums: mean = S/M, var = max(Q/M - mean^2, 0).
  total, total_sq = kernels.channel_sums(x)
  count = x.size // x.shape[-1]
  mean = total / count
  return mean, jnp.maximum(total_sq / count - jnp.square(mean), 0.0)


def _closed_form(statistics, centred_sums):
  """normalize_batch with the closed-form gradient, its batch statistics from
  `statistics(x)` and the backward's sums from `centred_sums(dy, x, mean)`."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def normalize_batch(x, scale, bias, epsilon):
    return forward(x, scale, bias, epsilon)[0]

  def forward(x, scale, bias, epsilon):
    mean, var = statistics(x)
    y = normalize(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)

  def backward(epsilon, res, cotangents):
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

  normalize_batch.defvjp(forward, backward)
  return normalize_batch


NORMALIZE_BATCH = {"cpu": _closed_form(batch_statistics, _xla_centred_sums),
                   "onednn": _closed_form(_kernel_statistics, kernels.centred_sums)}
