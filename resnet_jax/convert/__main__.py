"""python -m resnet_jax.convert import|export|from-run ...  (see resnet_jax/convert/__init__.py)

Bad input (unknown model, keys or shapes that do not fit, a .pth without torch, a file that
is not what its flag promised, a workdir without checkpoints, a missing step, --ema on a run
without EMA) stops with one line on stderr and exit code 2.
"""

import argparse
import json
import logging
import os
import sys

# from-run reads the dataset's labels through TFDS: keep TensorFlow's C++ logging out.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

USAGE_EXAMPLES = """examples (prefix: python -m resnet_jax.convert):
  import --model resnet50 --from torchvision resnet50.pth r50.safetensors
  import --model resnet50d --from timm model.safetensors r50d.safetensors
  import --model resnet50_v1 --from keras resnet50.weights.h5 r50v1.safetensors
  export --model resnet50 r50.safetensors r50_torchvision.safetensors
  from-run experiments/runs/digits_resnet20 digits.safetensors          # latest checkpoint
  from-run --best --ema experiments/runs/digits_resnet20 digits_best_ema.safetensors
"""


def _parser() -> argparse.ArgumentParser:
  from resnet_jax import convert  # noqa: PLC0415  (numpy, jax: not before a usage error)
  parser = argparse.ArgumentParser(
      prog="python -m resnet_jax.convert", epilog=USAGE_EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert ResNet weights: torchvision / timm / Keras -> resnet_jax, "
                  "resnet_jax -> torchvision layout, and a training run's checkpoint -> "
                  "resnet_jax. Outputs are .safetensors.")
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="torchvision/timm/Keras file -> our .safetensors")
  imp.add_argument("--model", required=True, help="registered name, e.g. resnet50")
  imp.add_argument("--from", dest="source", required=True,
                   choices=("torchvision", "timm", "keras"))
  imp.add_argument("--num-classes", type=int, default=None,
                   help="default: the file's classifier width; 0 keeps the backbone only")
  imp.add_argument("--preprocessing", default=None, metavar="JSON",
                   help="override fields of the source's preprocessing metadata, e.g. "
                        "'{\"crop_pct\": 0.95}'")
  imp.add_argument("input", help=".safetensors / .pth (torchvision, timm), .weights.h5 / "
                                 ".keras (Keras)")
  imp.add_argument("output", help="our .safetensors")
  exp = sub.add_parser("export", help="our .safetensors -> torchvision-layout .safetensors")
  exp.add_argument("--model", default=None, help="must match the file's model if given")
  exp.add_argument("input", help="our .safetensors")
  exp.add_argument("output", help="torchvision-layout .safetensors")
  run = sub.add_parser(
      "from-run", help="a training run's checkpoint -> our .safetensors",
      description="Write a run's checkpoint (latest, --step N or --best; raw weights or "
                  "--ema) as our weights file, with the run's model, its class names and "
                  "the preprocessing its evaluation used (from WORKDIR/config.json), so "
                  "`predict` and `export` take it. Reads the workdir only.")
  convert.add_run_checkpoint_arguments(run)
  run.add_argument("workdir", help="the run's workdir (config.json, checkpoints/)")
  run.add_argument("output", help="our .safetensors")
  return parser


def _run(args) -> str:
  # Imported after parsing so --help stays instant (jax is slow to import).
  from resnet_jax import convert  # noqa: PLC0415
  if not args.output.endswith(".safetensors"):
    raise ValueError(f"output {args.output!r} must end with .safetensors")
  if args.command == "from-run":
    info, notes = convert.from_run_file(args.workdir, args.output, step=args.step,
                                        best=args.best, ema=args.ema)
    for note in notes:
      print(f"convert: note: {note}", file=sys.stderr)
    return (f"wrote {args.output}: {info['model']}, {info['num_classes']} classes, "
            f"{'EMA' if args.ema else 'raw'} weights of step {info['step']} "
            f"({'best' if args.best else 'checkpoints'}) of {args.workdir}")
  if args.command == "import":
    overrides = _parse_overrides(args.preprocessing)
    info = convert.convert_file(args.input, args.output, args.model, args.source,
                                args.num_classes, overrides)
    return (f"wrote {args.output}: {info['model']}, {info['num_classes']} classes, "
            f"from {info['source']}")
  info = convert.export_file(args.input, args.output, args.model)
  return f"wrote {args.output}: {info['model']} in torchvision layout"


def _parse_overrides(text):
  if text is None:
    return None
  try:
    overrides = json.loads(text)
  except ValueError as e:
    raise ValueError(f"--preprocessing is not JSON ({e})") from None
  if not isinstance(overrides, dict):
    raise ValueError("--preprocessing must be a JSON object")
  return overrides


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  # Orbax and TFDS (from-run) log through absl at WARNING what this command cannot act on.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    print(_run(args))
  except (ValueError, KeyError, OSError) as e:
    # KeyError's str() is the repr of its message: strip the quotes it adds.
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"convert: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
  finally:
    absl_log.setLevel(level)
  return 0


if __name__ == "__main__":
  sys.exit(main())
