"""What the checkpoint checksums cost on a ResNet-50 train state, next to a real save.

  PYTHONPATH=. python experiments/checkpoint_checksum_cost.py [--repeats 5]

Builds the real state (ResNet-50, 1000 classes, SGD with momentum: params + momentum + BN
statistics, ~51M float32), with the momentum filled with small random values as after some
training (a fresh state's zero momentum would compress to nothing and flatter the save). Then
times, on this machine's devices:

  checksums         checkpoints.checksums(state): the jitted function over every array, the
                    (n, 2) uint32 sums brought to the host. Compiled once (timed apart), then
                    the median of --repeats calls.
  save (orbax)      the same state through Orbax's CheckpointManager, without checksums: the
                    blocking part of the async save (until it returns) and until it is on disk.
  save (ours)       Checkpoints.save, which computes the checksums first, same two times.
  restore           restore_latest (restore + checksum verification) against a raw Orbax
                    restore of the same step.

Each save goes to a fresh step in a temporary directory (deleted at the end).
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from resnet_jax import models
from resnet_jax.config_schema import base_config
from resnet_jax.training import checkpoints, optimizer, state as state_lib


def build_state():
  config = base_config()
  model = models.create("resnet50", num_classes=1000)
  schedule = optimizer.create_schedule(config.optimizer, config.schedule, steps_per_epoch=100,
                                       total_steps=1000)
  tx = optimizer.create_optimizer(config.optimizer, schedule)
  # Parameter shapes do not depend on the image size (global pooling): a small image keeps
  # the initialising forward pass cheap.
  state = jax.jit(state_lib.make_init_fn(model, tx, (1, 64, 64, 3), seed=0))()
  leaves, treedef = jax.tree.flatten(state.opt_state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [1e-3 * jax.random.normal(k, x.shape, x.dtype) if x.ndim else x
            for k, x in zip(keys, leaves)]
  return state.replace(opt_state=jax.tree.unflatten(treedef, leaves))


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def median_of(repeats, fn):
  return statistics.median(timed(fn)[0] for _ in range(repeats))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  state = jax.block_until_ready(build_state())
  arrays = jax.tree.leaves(state)
  elements = sum(x.size for x in arrays)
  size = sum(x.nbytes for x in arrays)
  print(f"state: {len(arrays)} arrays, {elements / 1e6:.1f}M elements, {size / 2**20:.0f} MiB; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPU "
        f"core(s)")

  compile_s, sums = timed(lambda: checkpoints.checksums(state))
  print(f"checksums: first call (compile + run) {compile_s:.2f} s for {len(sums)} arrays")
  checksum_s = median_of(args.repeats, lambda: checkpoints.checksums(state))
  print(f"checksums: median of {args.repeats} calls {checksum_s * 1e3:.0f} ms "
        f"({size / 2**30 / checksum_s:.2f} GiB/s)")

  cfg = base_config().checkpoint
  cfg.keep = 2 * args.repeats + 2
  with tempfile.TemporaryDirectory(prefix="checksum_cost_") as workdir:
    ckpts = checkpoints.Checkpoints(workdir, cfg)
    plain_args = lambda step: ocp.args.Composite(  # noqa: E731
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step}))
    step = 0
    results = {}
    for name, save in (
        ("save (orbax, no checksums)",
         lambda step: ckpts.manager.save(step, args=plain_args(step), force=True)),
        ("save (Checkpoints.save)",
         lambda step: ckpts.save(step, state, {"step": step}, force=True))):
      blocking, total = [], []
      for _ in range(args.repeats):
        step += 1
        start = time.perf_counter()
        save(step)
        blocking.append(time.perf_counter() - start)
        ckpts.manager.wait_until_finished()
        total.append(time.perf_counter() - start)
      results[name] = (statistics.median(blocking), statistics.median(total))
      print(f"{name}: median of {args.repeats}: returns after {results[name][0]:.2f} s, "
            f"on disk after {results[name][1]:.2f} s")

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    raw_s = median_of(args.repeats, lambda: jax.block_until_ready(ckpts.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]))
    ours_s = median_of(args.repeats,
                       lambda: jax.block_until_ready(ckpts.restore_latest(abstract, {})[0]))
    print(f"restore: orbax {raw_s:.2f} s, restore_latest (with verification) {ours_s:.2f} s "
          f"(median of {args.repeats})")
    ckpts.close()

  orbax_total = results["save (orbax, no checksums)"][1]
  print(f"checksums / orbax save on disk: {checksum_s / orbax_total:.1%}; checksums / orbax "
        f"restore: {checksum_s / raw_s:.1%}")


if __name__ == "__main__":
  main()
