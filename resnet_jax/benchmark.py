"""Train-step throughput: `python -m resnet_jax.benchmark [options]`.

Weak scaling over device counts: the per-device batch is fixed, the global batch grows
with the devices, and each count gets its own mesh over the first N devices. For each
count it reports compile time, step time (median of --steps after --warmup), images/s,
the FLOPs of one step (XLA's cost analysis of the compiled step; with a CPU lowering, whose
kernels XLA cannot see into, of the same step lowered with the model's default layers),
achieved FLOP/s, MFU and peak memory.

Modes:
  --mode synthetic   (default) random uint8 batches already on device: the compiled step
                     alone (compute, and the cross-device reductions of gradients and BN
                     statistics).
  --mode end_to_end  batches from the real input pipeline of a config file (--config;
                     `--config.KEY=VALUE` overrides as for training), fed exactly as the
                     trainer feeds them: host numpy batch -> global jax.Array -> step,
                     metrics fetched one step late. Image size, channels and classes are
                     the dataset's. With --config (either mode) the model and the step are
                     the trainer's for that config: drop path, SE, BN settings, label
                     smoothing, gradient accumulation, EMA, NaN policy, model.dtype;
                     --model and --dtype override the config's.

MFU = achieved FLOP/s / peak FLOP/s of the devices used. The peak comes from a table of
known accelerators (dense bf16/fp32 spec sheets), --peak-tflops, or on CPU a large matmul
in the compute dtype timed in the same run. f32 steps on Ampere/Hopper GPUs may run
matmuls in TF32, so their MFU against the fp32 peak can exceed 1.

On CPU the "devices" are fake (--xla_force_host_platform_device_count) and share the same
cores: 8 fake devices cannot be faster than 1, so the numbers show the sharding overhead
only. On GPUs/TPUs they are the real scaling.

  python -m resnet_jax.benchmark --model resnet20 --image-size 32 --batch-per-device 32
  python -m resnet_jax.benchmark --model resnet50 --image-size 224 --num-classes 1000 \\
      --batch-per-device 32 --devices 1 --lowering native --json out.json
  python -m resnet_jax.benchmark --mode end_to_end --config configs/digits_resnet20.py \\
      --batch-per-device 64 --devices 1
  # on one GPU:
  python -m resnet_jax.benchmark --model resnet50 --image-size 224 --num-classes 1000 \\
      --dtype bfloat16 --batch-per-device 256 --devices 1

`--json` alone prints the results as JSON on stdout (the table then goes to stderr);
`--json=FILE` writes them to FILE.
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time

# Dense peak FLOP/s per device from spec sheets: (substring of device_kind, bf16, fp32).
# First match wins, so the more specific names come first. TPUs have no fp32 matmul peak.
PEAK_FLOPS = (
    ("h100 pcie", 756e12, 51e12),
    ("h100", 989e12, 67e12),
    ("h200", 989e12, 67e12),
    ("gh200", 989e12, 67e12),
    ("a100", 312e12, 19.5e12),
    ("v5 lite", 197e12, None),
    ("v5e", 197e12, None),
    ("v5p", 459e12, None),
    ("tpu v5", 459e12, None),
    ("tpu v4", 275e12, None),
)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", default="synthetic", choices=("synthetic", "end_to_end"))
  p.add_argument("--config", default="", help="config file (end_to_end mode)")
  p.add_argument("--model", default="", help="default: resnet20, or the config's model")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--batch-per-device", type=int, default=32)
  p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                 help="compute dtype (default: the config's model.dtype, else float32)")
  p.add_argument("--lowering", default="", choices=("", "auto", "native", "onednn", "cpu"),
                 help="how layers run (resnet_jax/lowering.py; default: the config's, else "
                      "auto: onednn on CPU where its kernels build, native on GPU/TPU)")
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--steps", type=int, default=10, help="timed steps per device count")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="peak TFLOP/s per device for MFU (default: table, or measured on CPU)")
  p.add_argument("--json", nargs="?", const="-", default="",
                 help="write results as JSON to FILE, or to stdout when no FILE is given")
  p.add_argument("--serve", action="store_true",
                 help="for experiments/benchmark_torch_peer.py: after warm-up, read a step "
                      "count per stdin line, run and time that many steps, answer with one "
                      "JSON line; stop at EOF (one device count only)")
  args, rest = p.parse_known_args(argv)
  args.config_overrides = {}
  for arg in rest:   # --config.KEY=VALUE, typed by the config schema as for training
    if not (arg.startswith("--config.") and "=" in arg):
      p.error(f"unrecognized argument {arg}")
    key, value = arg[len("--config."):].split("=", 1)
    args.config_overrides[key] = value
  if args.mode == "end_to_end" and not args.config:
    p.error("--mode end_to_end needs --config FILE")
  try:
    counts = [int(c) for c in args.devices.split(",")]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    p.error(f"--devices: expected comma-separated positive counts, got {args.devices!r}")
  for name in ("steps", "batch_per_device"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  return args


def _set_device_count_flag(counts):
  # Fake CPU devices must be requested before jax starts (no effect on GPU/TPU backends).
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(counts)}"


class _Workload:
  """What one benchmark runs: the config, the shape of its batches, where they come from."""

  def __init__(self, args):
    from resnet_jax import models
    from resnet_jax.config_schema import base_config
    from resnet_jax.training import setup

    self.args = args
    self.config = self._load_config(args) if args.config else base_config()
    if args.lowering:
      self.config.lowering = args.lowering
    if args.mode == "end_to_end":
      self.data = setup.prepare_data(self.config)
      self.inputs = self.data.inputs
    else:
      # The schedule's shape does not change the work a step does.
      self.inputs = setup.Inputs(image_shape=(args.image_size, args.image_size, args.channels),
                                 num_classes=args.num_classes, mean=(127.5,), std=(64.0,),
                                 steps_per_epoch=100)
    self.shape, self.num_classes = self.inputs.image_shape, self.inputs.num_classes
    self.model_name = args.model or (self.config.model.name if args.config else "resnet20")
    if self.model_name not in models.MODEL_SPECS:
      raise UsageError(f"unknown model {self.model_name!r}; known: "
                       f"{', '.join(models.list_models())}")
    # The trainer's model and step for the config (without one, the base config's defaults:
    # float32, no accumulation, plain cross-entropy).
    accum = self.config.optimizer.grad_accum_steps
    if args.batch_per_device % accum:
      raise UsageError(f"--batch-per-device {args.batch_per_device}: expected a multiple "
                       f"of the config's optimizer.grad_accum_steps={accum}")
    args.dtype = args.dtype or self.config.model.dtype

  @staticmethod
  def _load_config(args):
    from resnet_jax.config_cli import resolve
    return resolve(args.config, args.config_overrides)[0]

  def setup(self, mesh, lowering):
    from resnet_jax.training import setup
    return setup.build(self.config, self.inputs, mesh=mesh, lowering=lowering,
                       model_name=self.model_name, dtype=self.args.dtype)

  def batches(self, mesh, global_batch: int):
    """An endless iterator of global batches (jax.Arrays sharded over `mesh`)."""
    import jax
    import numpy as np
    from resnet_jax.training import mesh as mesh_lib
    if self.args.mode == "synthetic":
      rng = np.random.RandomState(0)
      data = {"image": rng.randint(0, 256, (global_batch,) + self.shape).astype(np.uint8),
              "label": rng.randint(0, self.num_classes, (global_batch,)).astype(np.int32)}
      data = jax.device_put(data, mesh_lib.batch_sharding(mesh))
      while True:
        yield data
    from resnet_jax.data import input_pipeline
    local = input_pipeline.train_batches(
        self.data.builder, self.config.data, seed=self.config.seed, global_batch=global_batch,
        start_step=0, split_info=self.data.train_split, process_index=jax.process_index(),
        process_count=jax.process_count())
    for batch in local:
      yield mesh_lib.global_batch(batch, mesh)


def _compile_step(work, mesh, lowering, first_batch):
  """(initial state, compiled step, compile seconds, FLOPs per step and device or None)."""
  import jax
  from resnet_jax import models
  from resnet_jax.training import mesh as mesh_lib
  run = work.setup(mesh, lowering)
  state = run.init_state()
  t0 = time.perf_counter()
  compiled = run.train_step.lower(state, first_batch).compile()
  compile_s = time.perf_counter() - t0
  flops = step_flops(compiled)
  if run.lowering.layers:
    # XLA counts no FLOPs in FFI calls or custom VJPs it cannot see through: count the same
    # step's with the model's default layers, lowered (not compiled: the global module,
    # before partitioning).
    native = run.model.clone(**models.DEFAULT_LAYERS)
    shardings = dict(in_shardings=(run.state_sharding, mesh_lib.batch_sharding(mesh)),
                     out_shardings=(run.state_sharding, mesh_lib.replicated(mesh)))
    total = step_flops(jax.jit(run.unjitted_train_step(native), **shardings).lower(
        state, first_batch))
    flops = total / mesh.size if total else None
  return state, compiled, compile_s, flops


def step_flops(stage) -> float | None:
  """FLOPs of one step from XLA's cost analysis of a compiled (per device, as partitioned)
  or lowered (global) step."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # some backends/plugins do not implement it
    return None
  if isinstance(cost, (list, tuple)):   # older jax: one dict per partition
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _timed_steps(compiled, state, batches, count: int, pipelined: bool):
  """Run `count` steps; return (state, per-step seconds).

  synthetic: each step is waited for (the step alone). end_to_end (pipelined): as the
  trainer runs, step k+1 is queued before step k's metrics are fetched, so the host
  prepares input while the device computes; a step's time is then the interval between
  successive completions.
  """
  import jax
  times = []
  if not pipelined:
    for _ in range(count):
      batch = next(batches)
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    return state, times
  state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  last = time.perf_counter()
  state, pending = compiled(state, next(batches))
  for _ in range(count):
    state, metrics = compiled(state, next(batches))
    jax.block_until_ready(pending)
    now = time.perf_counter()
    times.append(now - last)
    last, pending = now, metrics
  jax.block_until_ready(pending)
  return state, times


def cpu_matmul_peak(dtype: str, size: int = 4096, repeats: int = 3) -> float:
  """FLOP/s of a large square matmul on the host: the practical CPU peak for MFU."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best


def device_peak(args, device) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it comes from)."""
  if args.peak_tflops > 0:
    return args.peak_tflops * 1e12, "--peak-tflops"
  if device.platform == "cpu":
    return cpu_matmul_peak(args.dtype), f"measured {args.dtype} 4096^3 matmul on the host"
  kind = device.device_kind.lower()
  for name, bf16, fp32 in PEAK_FLOPS:
    if name in kind:
      peak = bf16 if args.dtype == "bfloat16" else fp32
      return peak, f"spec sheet ({name}, {args.dtype}, dense)" if peak else "unknown"
  return None, f"unknown device kind {device.device_kind!r}"


def peak_memory(devices) -> tuple[int | None, str]:
  """(bytes, what they measure): the devices' peak allocation, else the process max RSS."""
  stats = [d.memory_stats() for d in devices]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use (max)"
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
  return rss_kib * 1024, "process max RSS (no device memory stats on this backend)"


def _sig(x: float, digits: int = 4) -> float:
  """`x` to `digits` significant figures (fixed decimals would round a small model's
  TFLOP/s or MFU to 0)."""
  return float(f"{x:.{digits}g}")


def _row(n, batch, compile_s, times, flops, peak_total, memory_bytes):
  import numpy as np
  step_s = float(np.median(times))
  achieved = flops * n / step_s if flops else None
  return dict(devices=n, global_batch=batch, compile_s=round(compile_s, 2),
              step_ms=round(step_s * 1e3, 2), step_ms_all=[round(t * 1e3, 2) for t in times],
              images_per_s=round(batch / step_s, 1),
              flops_per_step=flops * n if flops else None,
              achieved_tflops=_sig(achieved / 1e12) if achieved else None,
              mfu=_sig(achieved / peak_total) if achieved and peak_total else None,
              peak_memory_bytes=memory_bytes)


def _serve(compiled, state, batches, pipelined: bool, reply):
  """Answer step counts read from stdin with the measured step times (one JSON line)."""
  for line in sys.stdin:
    if not line.strip():
      continue
    state, times = _timed_steps(compiled, state, batches, int(line), pipelined)
    print(json.dumps({"step_s": times}), file=reply, flush=True)


# Options not echoed in the results: the workload's real shape is reported instead.
_NOT_REPORTED = ("serve", "config_overrides", "image_size", "channels", "num_classes")


class UsageError(Exception):
  """A request this machine cannot serve; the message is the one line shown."""


def run(args, out, reply) -> dict:
  """The benchmark; the table goes to `out`, --serve answers to `reply`."""
  import jax
  from resnet_jax import lowering as lowering_lib
  from resnet_jax.training import mesh as mesh_lib

  counts = [int(c) for c in args.devices.split(",")]
  available = jax.devices()
  if max(counts) > len(available):
    raise UsageError(f"--devices asks for {max(counts)}, {len(available)} available")
  work = _Workload(args)
  lowering = lowering_lib.choose(work.config.lowering)   # e.g. onednn without g++: one line
  device = available[0]
  peak, peak_source = device_peak(args, device)
  # A measured CPU peak is the whole host's, which the fake devices share.
  host_peak = device.platform == "cpu" and not args.peak_tflops
  h, w, c = work.shape
  process = lowering_lib.describe_process()
  print(f"{work.model_name} {h}x{w}x{c} {args.dtype}, {args.batch_per_device}/device, "
        f"{args.mode}, lowering {work.config.lowering} (-> {lowering.name}), backend "
        f"{jax.default_backend()} ({device.device_kind}), jax {jax.__version__}"
        + (f", {process}" if process else ""), file=out)
  print(f"{'devices':>7} {'global batch':>12} {'compile s':>9} {'step ms':>9} "
        f"{'images/s':>10} {'efficiency':>10} {'TFLOP/s':>8} {'MFU':>7}", file=out)
  rows, base = [], None
  pipelined = args.mode == "end_to_end"
  for n in counts:
    mesh = mesh_lib.create_mesh(devices=available[:n])
    batch = n * args.batch_per_device
    batches = work.batches(mesh, batch)
    state, compiled, compile_s, flops = _compile_step(work, mesh, lowering, next(batches))
    state, _ = _timed_steps(compiled, state, batches, args.warmup, pipelined)
    if args.serve:
      print(json.dumps({"ready": True, "compile_s": compile_s, "flops_per_step": flops}),
            file=reply, flush=True)
      _serve(compiled, state, batches, pipelined, reply)
      return {}
    state, times = _timed_steps(compiled, state, batches, args.steps, pipelined)
    del state
    peak_total = (peak if host_peak else peak * n) if peak else None
    row = _row(n, batch, compile_s, times, flops, peak_total, peak_memory(available[:n])[0])
    base = base or row["images_per_s"] / n
    row["efficiency"] = round(row["images_per_s"] / (n * base), 3)
    rows.append(row)
    tflops = f"{row['achieved_tflops']:.3f}" if row["achieved_tflops"] else "n/a"
    mfu = f"{row['mfu']:.3f}" if row["mfu"] else "n/a"
    print(f"{n:>7} {batch:>12} {compile_s:>9.2f} {row['step_ms']:>9.2f} "
          f"{row['images_per_s']:>10.1f} {row['efficiency']:>10.3f} {tflops:>8} {mfu:>7}",
          file=out, flush=True)
  memory, memory_source = peak_memory(available[:max(counts)])
  print(f"peak memory {memory / 2**30:.2f} GiB ({memory_source}); peak "
        f"{(peak or 0) / 1e12:.2f} TFLOP/s per device ({peak_source})", file=out)
  if jax.default_backend() == "cpu":
    print("note: CPU fake devices share the same cores; efficiency < 1 here is overhead, "
          "not a scaling result", file=out)
  return dict(
      {k: v for k, v in vars(args).items() if k not in _NOT_REPORTED},
      model=work.model_name, image_shape=list(work.shape), num_classes=work.num_classes,
      lowering=work.config.lowering, lowering_resolved=lowering.name,
      backend=jax.default_backend(), process_setup=process,
      device_kind=device.device_kind, jax=jax.__version__,
      peak_flops=peak, peak_flops_source=peak_source,
      peak_flops_is_whole_host=host_peak, peak_memory_bytes=memory,
      peak_memory_source=memory_source, xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  _set_device_count_flag([int(c) for c in args.devices.split(",")])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # tf.data only feeds batches here
  to_stdout = args.json == "-"
  if args.serve and len(args.devices.split(",")) != 1:
    print("benchmark: error: --serve takes one device count", file=sys.stderr)
    return 2
  from resnet_jax.errors import ConfigError   # no jax: XLA_FLAGS is set above
  # With JSON on stdout (or serving), the human-readable table goes to stderr.
  reply = sys.stdout
  try:
    if to_stdout or args.serve:
      # Keep stdout pure JSON: the table and anything else printed (TFDS) go to stderr.
      with contextlib.redirect_stdout(sys.stderr):
        result = run(args, sys.stderr, reply)
    else:
      result = run(args, sys.stdout, reply)
  except (UsageError, ConfigError) as e:
    print(f"benchmark: error: {e}", file=sys.stderr)
    return 2
  if args.serve:
    return 0
  if to_stdout:
    print(json.dumps(result, indent=2))
  elif args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  from resnet_jax import lowering
  lowering.prepare_process()   # CPU-backend processes only; see resnet_jax/lowering.py
  sys.exit(main())
