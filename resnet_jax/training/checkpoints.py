"""Orbax checkpoints in <workdir>/checkpoints: periodic async saves, keep last N, resume."""

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        save_interval_steps=ckpt_cfg.every_steps,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state):
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def read(self, step: int):
    """The saved state as a plain pytree (no target needed), e.g. for inspection."""
    return self.manager.restore(step, args=ocp.args.StandardRestore())

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Async save if `step` is on the interval (or forced); returns whether one started."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
