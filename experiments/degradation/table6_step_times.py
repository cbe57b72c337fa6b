"""Step time of each net of the ResNet paper's CIFAR-10 table, and the 64k-iteration schedule
projected from it.

For each net it runs the benchmark's synthetic mode -- the compiled train step the trainer
runs, on batches already on the device, at the paper's batch of 128:

  python -m resnet_jax.benchmark --model NET --image-size 32 --num-classes 10 \\
      --batch-per-device 128 --devices 1 --steps S --json

and reports the median step, images/s and `--iterations` (default 64,000) x the median step:
the full schedule's training compute, without evaluation or the input pipeline. Then a
Markdown table (stdout, and `--out FILE`) with the hardware the benchmark reported.

  python experiments/degradation/table6_step_times.py                  # every Table-6 net
  python experiments/degradation/table6_step_times.py --nets resnet20,plain56 --steps 20
  python experiments/degradation/table6_step_times.py --dtype bfloat16 --out gpu.md   # GPU

On 2 CPU cores ResNet-1202 takes minutes to compile and ~10 s a step: leave it out there
(`--nets resnet20,resnet32,resnet44,resnet56,resnet110`). The benchmark reads its defaults
through ml_collections; neither TensorFlow nor the package install is needed. An
environment with only jax, flax, optax and orbax (a bare GPU image) runs it from the
repository root with ml_collections on its path:

  pip install --no-deps --target DIR ml_collections
  PYTHONPATH=DIR python experiments/degradation/table6_step_times.py --dtype bfloat16
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The paper's Table 6 (option A shortcuts) and the plain twins of Fig. 6.
NETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
        "plain20", "plain56")


def step_time(net: str, args) -> dict:
  """The benchmark's JSON for one net (one device, synthetic batches)."""
  cmd = [sys.executable, "-m", "resnet_jax.benchmark", "--model", net, "--image-size", "32",
         "--num-classes", "10", "--batch-per-device", str(args.batch), "--devices", "1",
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
         "--lowering", args.lowering, "--json"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if out.returncode != 0:
    tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise SystemExit(f"table6_step_times: the benchmark failed for {net}: {tail}")
  return json.loads(out.stdout)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nets", default=",".join(NETS), help="comma-separated model names")
  p.add_argument("--batch", type=int, default=128, help="the paper's: 128")
  p.add_argument("--steps", type=int, default=50, help="timed steps per net")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--lowering", default="auto")
  p.add_argument("--iterations", type=int, default=64_000, help="the schedule to project")
  p.add_argument("--out", default="", help="also write the table to this Markdown file")
  args = p.parse_args(argv)

  rows, hardware = [], ""
  for net in filter(None, args.nets.split(",")):
    result = step_time(net, args)
    row = result["rows"][0]
    hours = row["step_ms"] / 1e3 * args.iterations / 3600
    hardware = (f"{result['device_kind']} ({result['backend']}), jax {result['jax']}, "
                f"{result['dtype']}, lowering {result['lowering_resolved']}")
    rows.append(f"| {net} | {row['step_ms']:.2f} | {row['images_per_s']:.0f} | "
                f"{row['compile_s']:.1f} | {hours:.2f} |")
    print(f"{net}: {row['step_ms']:.2f} ms/step -> {hours:.2f} h for {args.iterations:,} "
          f"iterations", file=sys.stderr, flush=True)

  table = "\n".join([
      f"Batch {args.batch}, synthetic, median of {args.steps} steps after {args.warmup}; "
      f"{hardware}.",
      "",
      f"| net | ms/step | images/s | compile s | {args.iterations:,} iterations, h |",
      "|---|---:|---:|---:|---:|", *rows, ""])
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
