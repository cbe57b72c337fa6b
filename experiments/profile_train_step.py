"""Where a train step's time goes: XLA ops of one compiled step, by kind and by instance.

Compiles the same step as `python -m resnet_jax.benchmark` (synthetic batch, one device),
runs it under `jax.profiler.trace`, and sums the XLA op events of the trace: per op kind
("ynn_fusion" = YNNPACK's matmuls and reductions, "transpose_copy_fusion", the BN/ReLU loop
fusions, the CPU kernels' FFI calls by target, ...)
and for the slowest instances, with the HLO of each written beside the trace. This is how
the CPU lowerings in resnet_jax/cpu_speed/ were found (experiments/performance.md).

  python experiments/profile_train_step.py --model resnet50 --image-size 224 \\
      --num-classes 1000 --batch 32 --lowering cpu
  python experiments/profile_train_step.py --model resnet20 --batch 128 --lowering native

Times are summed over the events of the traced steps and divided by their number; ops that
run concurrently on different threads both count, so the kinds can add up to more than the
step time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet20")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lowering", default="auto", choices=("auto", "native", "cpu", "onednn"))
  p.add_argument("--steps", type=int, default=2, help="traced steps")
  p.add_argument("--top", type=int, default=25, help="slowest op instances to list")
  p.add_argument("--out", default="/tmp/resnet_jax_profile", help="trace and HLO go here")
  args = p.parse_args(argv)

  import jax
  from resnet_jax import benchmark, lowering
  from resnet_jax.training import mesh as mesh_lib

  bench_args = benchmark._parse([
      "--model", args.model, "--image-size", str(args.image_size), "--num-classes",
      str(args.num_classes), "--batch-per-device", str(args.batch), "--devices", "1"])
  chosen = lowering.choose(args.lowering)
  work = benchmark._Workload(bench_args)
  mesh = mesh_lib.create_mesh(devices=jax.devices()[:1])
  batches = work.batches(mesh, args.batch)
  state, compiled, compile_s, _ = benchmark._compile_step(work, mesh, chosen, next(batches))
  state, times = benchmark._timed_steps(compiled, state, batches, 3, pipelined=False)
  print(f"{args.model} {args.image_size}px batch {args.batch}, lowering {args.lowering} "
        f"(-> {chosen.name}): compile {compile_s:.1f}s, untraced steps "
        f"{', '.join(f'{t * 1e3:.0f}' for t in times)} ms")

  shutil.rmtree(args.out, ignore_errors=True)
  with jax.profiler.trace(args.out, create_perfetto_trace=True):
    state, _ = benchmark._timed_steps(compiled, state, batches, args.steps, pipelined=False)
  hlo = compiled.as_text()
  with open(os.path.join(args.out, "hlo.txt"), "w") as f:
    f.write(hlo)
  # FFI calls (the "onednn" lowering's kernels) show as ffi_call.N: name them by target.
  targets = dict(re.findall(r"%(ffi_call[\w.]*) = .*?custom_call_target=\"(\w+)\"", hlo))
  trace = glob.glob(os.path.join(args.out, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_op, by_kind = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    # XLA ops only: not Python frames ($...), executor bookkeeping or the profiler itself.
    if e.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "trace" in name:
      continue
    by_op[name] += e["dur"]
    by_kind[targets.get(name) or name.rsplit(".", 1)[0]] += e["dur"]
  ms = lambda us: us / args.steps / 1e3   # noqa: E731
  print(f"\nms/step by op kind (HLO of the step: {args.out}/hlo.txt)")
  for kind, us in by_kind.most_common(15):
    print(f"{ms(us):9.1f}  {kind}")
  print(f"\nslowest {args.top} op instances")
  for name, us in by_op.most_common(args.top):
    print(f"{ms(us):9.1f}  {name}")
  return 0


if __name__ == "__main__":
  from resnet_jax import lowering
  lowering.prepare_process()   # profile what the entry points run (resnet_jax/lowering.py)
  sys.exit(main())
