"""Train-step throughput: `python -m resnet_jax.benchmark [options]`.

Weak scaling over device counts: the per-device batch is fixed, the global batch grows
with the devices, and each count gets its own mesh over the first N devices. Batches are
synthetic and already on device, so this measures the compiled step (compute, and the
cross-device reductions of gradients and BN statistics), not the input pipeline.

On CPU the "devices" are fake (--xla_force_host_platform_device_count) and share the same
cores: 8 fake devices cannot be faster than 1, so the numbers show the sharding overhead
only. On GPUs/TPUs they are the real scaling.

  python -m resnet_jax.benchmark --model resnet20 --image-size 32 --batch-per-device 32
  python -m resnet_jax.benchmark --model resnet50 --image-size 224 --dtype bfloat16 \\
      --batch-per-device 256 --devices 1,2,4,8
"""

import argparse
import json
import os
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet20")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--batch-per-device", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--steps", type=int, default=10, help="timed steps per device count")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--json", default="", help="also write the results to this file")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  counts = [int(c) for c in args.devices.split(",")]
  # Fake CPU devices must be requested before jax starts (no effect on GPU/TPU backends).
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(counts)}"

  import jax
  import numpy as np

  from resnet_jax import models
  from resnet_jax.config_schema import base_config
  from resnet_jax.training import mesh as mesh_lib, optimizer, state as state_lib, steps

  available = jax.devices()
  if max(counts) > len(available):
    print(f"benchmark: error: --devices asks for {max(counts)}, {len(available)} available",
          file=sys.stderr)
    return 2
  cfg = base_config()
  model = models.create(args.model, num_classes=args.num_classes, dtype=args.dtype)
  schedule = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=100,
                                       total_steps=10_000)
  tx = optimizer.create_optimizer(cfg.optimizer, schedule)
  shape = (args.image_size, args.image_size, args.channels)
  init_fn = state_lib.make_init_fn(model, tx, (1,) + shape, seed=0)
  step_fn = steps.make_train_step(model, tx, schedule, num_classes=args.num_classes,
                                  label_smoothing=0.0, mean=(127.5,), std=(64.0,))
  print(f"{args.model} {args.image_size}x{args.image_size} {args.dtype}, "
        f"{args.batch_per_device}/device, backend {jax.default_backend()} "
        f"({available[0].device_kind}), jax {jax.__version__}")
  print(f"{'devices':>7} {'global batch':>12} {'compile s':>9} {'step ms':>9} "
        f"{'images/s':>10} {'efficiency':>10}")
  rows, base = [], None
  for n in counts:
    mesh = mesh_lib.create_mesh(devices=available[:n])
    abstract = jax.eval_shape(init_fn)
    state_sharding = mesh_lib.state_shardings(abstract, mesh)
    state = jax.jit(init_fn, out_shardings=state_sharding)()
    batch = n * args.batch_per_device
    rng = np.random.RandomState(0)
    data = {"image": rng.randint(0, 256, (batch,) + shape).astype(np.uint8),
            "label": rng.randint(0, args.num_classes, (batch,)).astype(np.int32)}
    data = jax.device_put(data, mesh_lib.batch_sharding(mesh))
    train_step = jax.jit(step_fn, in_shardings=(state_sharding, mesh_lib.batch_sharding(mesh)),
                         out_shardings=(state_sharding, mesh_lib.replicated(mesh)),
                         donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    ips = batch / step_s
    base = base or ips / n
    row = dict(devices=n, global_batch=batch, compile_s=round(compile_s, 2),
               step_ms=round(step_s * 1e3, 2), images_per_s=round(ips, 1),
               efficiency=round(ips / (n * base), 3))
    rows.append(row)
    print(f"{n:>7} {batch:>12} {compile_s:>9.2f} {step_s * 1e3:>9.2f} {ips:>10.1f} "
          f"{row['efficiency']:>10.3f}", flush=True)
  if jax.default_backend() == "cpu":
    print("note: CPU fake devices share the same cores; efficiency < 1 here is overhead, "
          "not a scaling result")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(vars(args), backend=jax.default_backend(), jax=jax.__version__,
                     rows=rows), f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
