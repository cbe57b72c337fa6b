"""BatchNorm over groups of G examples ("ghost" BN), the semantics of pmap-era ResNet
training and MLPerf: each group of G consecutive examples is normalised with its own
statistics; the running averages take the mean over groups.

With G = the per-device batch, the groups are exactly the per-device shards of the global
batch (they are contiguous along the batch axis), so this reproduces per-device BN without
shard_map: each group's reduction stays inside one device's shard, and XLA inserts no
cross-device communication for it. Variables are named as nn.BatchNorm's ("scale", "bias",
"mean", "var"), so checkpoints and converted weights work with either.

Trade-off: global BN (the default) makes results independent of the device count; ghost BN
with small G adds regularising noise (sometimes better accuracy at large global batch) and
skips the all-reduce of statistics, but results then depend on G.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class GhostBatchNorm(nn.Module):
  group_size: int
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      y = (x32 - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon)
    else:
      batch, group = x.shape[0], self.group_size
      if batch % group:
        raise ValueError(f"GhostBatchNorm: batch {batch} is not a multiple of the group "
                         f"size {group} (config key model.bn_group_size)")
      xg = x32.reshape((batch // group, group) + x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      mean = jnp.mean(xg, axes, keepdims=True)
      # Same estimator as nn.BatchNorm: E[x^2] - E[x]^2, clipped at 0.
      var = jnp.maximum(jnp.mean(jnp.square(xg), axes, keepdims=True) - jnp.square(mean), 0.0)
      y = ((xg - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean.reshape(-1, features), 0)
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var.reshape(-1, features), 0)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)
