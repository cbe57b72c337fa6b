"""python -m resnet_jax.convert import|export ...  (see resnet_jax/convert/__init__.py)

Bad input (unknown model, keys or shapes that do not fit, a .pth without torch, a file that
is not what its flag promised) stops with one line on stderr and exit code 2.
"""

import argparse
import json
import sys

USAGE_EXAMPLES = """examples (prefix: python -m resnet_jax.convert):
  import --model resnet50 --from torchvision resnet50.pth r50.safetensors
  import --model resnet50d --from timm model.safetensors r50d.safetensors
  import --model resnet50_v1 --from keras resnet50.weights.h5 r50v1.safetensors
  export --model resnet50 r50.safetensors r50_torchvision.safetensors
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m resnet_jax.convert", epilog=USAGE_EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert ResNet weights: torchvision / timm / Keras -> resnet_jax, and "
                  "resnet_jax -> torchvision layout. Outputs are .safetensors.")
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
  return parser


def _run(args) -> str:
  # Imported after parsing so --help stays instant (jax is slow to import).
  from resnet_jax import convert  # noqa: PLC0415
  if not args.output.endswith(".safetensors"):
    raise ValueError(f"output {args.output!r} must end with .safetensors")
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
  try:
    print(_run(args))
  except (ValueError, KeyError, OSError) as e:
    # KeyError's str() is the repr of its message: strip the quotes it adds.
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"convert: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
