"""`python -m resnet_jax.predict --weights W.safetensors IMAGE [IMAGE ...]`: top-k classes.

The weights file (from `python -m resnet_jax.convert import`, or exported from a training
run) carries its model name and its preprocessing (input size, crop_pct, channel order,
mean/std); every image goes through exactly that, so torchvision, timm and Keras (Caffe BGR)
weights each get the input they were trained on without flags.
"""

import argparse
import sys


def preprocess(encoded: bytes, preprocessing: dict):
  """Encoded image -> float32 [size, size, 3], normalised as the weights expect."""
  import numpy as np  # noqa: PLC0415
  from resnet_jax.data import imagenet_preprocess  # noqa: PLC0415
  # Antialiased resizes, as PIL (torchvision, timm) and Keras' loaders do: the published
  # accuracies were measured on such inputs.
  image = imagenet_preprocess.eval_image(
      encoded, preprocessing["image_size"], crop_pct=preprocessing["crop_pct"],
      channel_order=preprocessing["channel_order"], antialias=True,
      interpolation=preprocessing.get("interpolation", "bilinear"))
  mean = np.asarray(preprocessing["mean"], np.float32)
  std = np.asarray(preprocessing["std"], np.float32)
  return (np.asarray(image, np.float32) - mean) / std


def predict(weights_path: str, images: list[bytes], top: int = 5):
  """[(class indices, probabilities)] per image, best first."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from resnet_jax.convert import weights_file  # noqa: PLC0415
  from resnet_jax.training import setup  # noqa: PLC0415
  variables, info = weights_file.load(weights_path)
  _, forward = setup.predictor(info["model"], info["num_classes"])
  batch = np.stack([preprocess(img, info["preprocessing"]) for img in images])
  logits = forward(variables, batch)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  order = np.argsort(-probs, axis=-1)[:, :top]
  return [(list(map(int, o)), [float(p[i]) for i in o]) for o, p in zip(order, probs)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--weights", required=True, help="a resnet_jax .safetensors weights file")
  p.add_argument("--top", type=int, default=5)
  p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
  args = p.parse_args(argv)
  images = []
  for path in args.images:
    try:
      with open(path, "rb") as f:
        images.append(f.read())
    except OSError as e:
      print(f"predict: error: cannot read image {path}: {e.strerror}", file=sys.stderr)
      return 2
  try:
    results = predict(args.weights, images, args.top)
  except ValueError as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 -- TF's decode errors: name the images
    print(f"predict: error: could not decode one of {', '.join(args.images)} as an image "
          f"({type(e).__name__})", file=sys.stderr)
    return 2
  for path, (classes, probs) in zip(args.images, results):
    ranked = "  ".join(f"{c}:{p:.3f}" for c, p in zip(classes, probs))
    print(f"{path}  {ranked}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
