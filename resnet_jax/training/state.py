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


def make_init_fn(model, tx: optax.GradientTransformation, input_shape, seed: int):
  """A function of no arguments that builds the initial TrainState (to jit or eval_shape)."""
  def init():
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=train_rng,
                      skipped_steps=jnp.zeros((), jnp.int32))
  return init


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
