"""Batch normalisation: the one norm layer of every ResNet here.

Same variables and math as `flax.linen.BatchNorm` (params `scale`, `bias`; batch_stats
`mean`, `var`; the fast variance E[x^2] - E[x]^2 clipped at 0; the same expression for the
output and the same momentum update), always computed in float32, whatever the model's
compute dtype: bf16 batch statistics lose too much.

Two options flax's has not:

- `group_size=G` ("ghost" BN, the semantics of pmap-era ResNet training and MLPerf): each
  group of G consecutive examples is normalised with its own statistics, and the running
  averages take the mean over the groups. With G = the per-device batch the groups are
  exactly the devices' shards of the global batch, so each group's reduction stays on its
  device and XLA inserts no communication for it. Trade-off: the default (statistics of the
  global batch) makes results independent of the device count; small G adds regularising
  noise and skips the all-reduce, but results then depend on G.
- `normalize_batch`: the training-mode math, `(x, scale, bias, epsilon) -> (y, mean, var)`.
  JAX differentiates the default; a backend can pass a faster one with the same numbers
  (resnet_jax/cpu_speed/batch_norm.py), as `nn.Conv` takes `conv_general_dilated`.

Under jit with a batch sharded over the mesh, "the batch" is the global batch: XLA inserts
the all-reduce of the statistics.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def batch_statistics(x):
  """Per-channel (mean, var) over every axis but the last: flax's fast variance."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  return mean, var


def normalize(x, mean, var, scale, bias, epsilon):
  """flax's expression, in flax's order of operations."""
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


def normalize_batch(x, scale, bias, epsilon):
  """Training mode: x normalised by its own statistics; returns (y, mean, var)."""
  mean, var = batch_statistics(x)
  return normalize(x, mean, var, scale, bias, epsilon), mean, var


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` for channels-last inputs, plus `group_size` and `normalize_batch`."""
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  group_size: int = 0                       # > 0: ghost BN over groups of this many examples
  normalize_batch: Callable = normalize_batch

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
      y = normalize(x32, ra_mean.value, ra_var.value, scale32, bias32, self.epsilon)
      return y.astype(out_dtype)
    if self.group_size > 0:
      y, mean, var = self._ghost(x32, scale32, bias32)
    else:
      y, mean, var = self.normalize_batch(x32, scale32, bias32, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)

  def _ghost(self, x, scale, bias):
    """Each group of `group_size` consecutive examples by its own statistics; (y, the mean
    of the groups' means, the mean of their variances)."""
    batch, group = x.shape[0], self.group_size
    if batch % group:
      raise ValueError(f"BatchNorm: batch {batch} is not a multiple of the group size "
                       f"{group} (config key model.bn_group_size)")
    groups = x.reshape((batch // group, group) + x.shape[1:])
    y, mean, var = jax.vmap(normalize_batch, in_axes=(0, None, None, None))(
        groups, scale, bias, self.epsilon)
    return y.reshape(x.shape), jnp.mean(mean, 0), jnp.mean(var, 0)
