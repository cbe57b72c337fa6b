"""The functional train state, built abstractly first so shardings and restore share it."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array          # raw uint32 key data: checkpoints as a plain array
  skipped_steps: jax.Array  # updates rejected as non-finite (nan_policy="skip")
  ema_params: Any = None    # EMA copies when optimizer.ema_decay > 0, else empty dicts
  ema_batch_stats: Any = None


def make_init_fn(model, tx: optax.GradientTransformation, input_shape, seed: int,
                 ema: bool = False):
  """A function of no arguments that builds the initial TrainState (to jit or eval_shape)."""
  def init():
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    copy = lambda tree: jax.tree.map(jnp.copy, tree) if ema else {}  # noqa: E731
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=train_rng,
                      skipped_steps=jnp.zeros((), jnp.int32),
                      ema_params=copy(params), ema_batch_stats=copy(batch_stats))
  return init


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
