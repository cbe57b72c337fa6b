"""`python -m resnet_jax.predict --weights W.safetensors INPUT [INPUT ...]`: top-k classes.

The weights file (from `python -m resnet_jax.convert import`, or `convert from-run` of a
training run) carries its model name and its preprocessing (input size, crop_pct, channel
order, mean/std); every image goes through exactly that, so torchvision, timm and Keras
(Caffe BGR) weights, and a run's own weights, each get the input they were trained on
without flags.

Inputs are image files or directories (every image file below them, recursively, in sorted
order; names starting with "." are left out). Images go through the model --batch-size at a
time. Output, one line per image in input order:

  PATH  743 n04254680 0.105  983 n11939491 0.073  ...      (index, name, probability)

or, with --json, one JSON object per line: {"path": ..., "top": [{"index": 743, "name":
"n04254680", "probability": 0.105...}, ...]}. Class names: the weights file's (a run's
dataset's labels, stored by `convert from-run`), else for 1000 classes ImageNet's as TFDS
ships them (ILSVRC2012 WordNet ids, e.g. n01440764), else none (the index alone; "name":
null in JSON).

Exit codes: 0 every image predicted; 1 some input could not be read or decoded (each named
in one line on stderr; every other image is still predicted and printed); 2 bad usage or a
weights file that cannot be used (one line, nothing predicted).
"""

import argparse
import importlib.util
import json
import os
import re
import sys

# TensorFlow only decodes and resizes here: keep its C++ logging and oneDNN banner out of the
# output, and its ops as the training input pipeline runs them (resnet_jax/main.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# What tf.io.decode_image reads; a directory contributes its files with these suffixes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DEFAULT_BATCH_SIZE = 32
# TFDS's ILSVRC2012 label file (class index order of imagenet2012 and of the published
# 1000-class weights), inside the installed tensorflow_datasets package; older TFDS
# versions kept it under image_classification/.
_IMAGENET_LABEL_FILES = ("datasets/imagenet2012/labels.txt",
                         "image_classification/imagenet2012_labels.txt")


def imagenet_class_names() -> list[str] | None:
  """ImageNet's 1000 class names (WordNet ids, in class index order) from the label file
  the installed tensorflow_datasets ships, read from the package without importing it (no
  download); None where it is not found."""
  try:
    spec = importlib.util.find_spec("tensorflow_datasets")
  except (ImportError, ValueError):
    return None
  for base in (spec.submodule_search_locations or []) if spec else []:
    for relative in _IMAGENET_LABEL_FILES:
      path = os.path.join(base, relative)
      if os.path.isfile(path):
        with open(path) as f:
          names = [line.strip() for line in f if line.strip()]
        if len(names) == 1000:
          return names
  return None


def class_names(info: dict) -> list[str] | None:
  """The names of a weights file's classes: its own, else ImageNet's for 1000 classes."""
  if info.get("class_names"):
    return list(info["class_names"])
  if info["num_classes"] == 1000:
    return imagenet_class_names()
  return None


def _resize_uint8(image, size, interpolation: str):
  """Antialiased resize, rounded back to uint8 (as imagenet_preprocess and image_folder)."""
  import tensorflow as tf  # noqa: PLC0415
  image = tf.image.resize(image, size, method=interpolation, antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decode_and_crop(encoded: bytes, preprocessing: dict, channels: int):
  """eval_image for any channel count (1: greyscale models) and for "resize": "squash"."""
  import tensorflow as tf  # noqa: PLC0415
  from resnet_jax.data import imagenet_preprocess  # noqa: PLC0415
  size = preprocessing["image_size"]
  interpolation = preprocessing.get("interpolation", "bilinear")
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  height, width = int(image.shape[0]), int(image.shape[1])
  if preprocessing.get("resize", "crop") == "squash":
    # The whole image to size x size, as an image folder is prepared for cifar-style runs.
    if (height, width) != (size, size):
      image = _resize_uint8(image, (size, size), interpolation)
  else:
    new_h, new_w = (int(v) for v in imagenet_preprocess.eval_resize_shape(
        height, width, imagenet_preprocess.eval_resize_size(size, preprocessing["crop_pct"])))
    if (new_h, new_w) != (height, width):
      image = _resize_uint8(image, (new_h, new_w), interpolation)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)   # half to even
    image = image[top:top + size, left:left + size]
  if channels == 3:
    image = imagenet_preprocess.to_channel_order(image, preprocessing["channel_order"])
  return image


def preprocess(encoded: bytes, preprocessing: dict):
  """Encoded image -> float32 [size, size, channels], normalised as the weights expect
  (channels: one per mean value, 3 or 1)."""
  import numpy as np  # noqa: PLC0415
  from resnet_jax.data import imagenet_preprocess  # noqa: PLC0415
  channels = len(preprocessing["mean"])
  if channels == 3 and preprocessing.get("resize", "crop") == "crop":
    # Antialiased resizes, as PIL (torchvision, timm) and Keras' loaders do: the published
    # accuracies were measured on such inputs.
    image = imagenet_preprocess.eval_image(
        encoded, preprocessing["image_size"], crop_pct=preprocessing["crop_pct"],
        channel_order=preprocessing["channel_order"], antialias=True,
        interpolation=preprocessing.get("interpolation", "bilinear"))
  else:
    image = _decode_and_crop(encoded, preprocessing, channels)
  mean = np.asarray(preprocessing["mean"], np.float32)
  std = np.asarray(preprocessing["std"], np.float32)
  return (np.asarray(image, np.float32) - mean) / std


class Predictor:
  """A weights file's model, jitted for batches of `batch_size` images (a shorter batch is
  padded, so one compilation serves every batch)."""

  def __init__(self, weights_path: str, batch_size: int = DEFAULT_BATCH_SIZE):
    from resnet_jax.convert import weights_file  # noqa: PLC0415
    from resnet_jax.training import setup  # noqa: PLC0415
    if batch_size < 1:
      raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    self.variables, self.info = weights_file.load(weights_path)
    self.preprocessing = self.info["preprocessing"]
    size, crop_pct = self.preprocessing["image_size"], self.preprocessing["crop_pct"]
    if not 0 < crop_pct <= 1:
      raise ValueError(f"{weights_path}: preprocessing crop_pct={crop_pct}; expected a value "
                       f"in (0, 1] (the center {size} of the image resized to {size}/crop_pct)")
    self.names = class_names(self.info)
    self.batch_size = batch_size
    _, self._forward = setup.predictor(self.info["model"], self.info["num_classes"])

  def probabilities(self, images: list):
    """[len(images), num_classes] softmax of preprocessed images (<= batch_size of them)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    batch = np.stack(images)
    n = len(batch)
    if n < self.batch_size:
      batch = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:],
                                              batch.dtype)])
    logits = self._forward(self.variables, batch)
    return np.asarray(jax.nn.softmax(logits, axis=-1))[:n]

  def top(self, images: list, k: int) -> list[tuple[list[int], list[float]]]:
    """[(class indices, probabilities)] per image, best first."""
    import numpy as np  # noqa: PLC0415
    probs = self.probabilities(images)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [(list(map(int, o)), [float(p[i]) for i in o]) for o, p in zip(order, probs)]

  def name(self, index: int) -> str | None:
    return self.names[index] if self.names else None


def predict(weights_path: str, images: list[bytes], top: int = 5,
            batch_size: int = DEFAULT_BATCH_SIZE):
  """[(class indices, probabilities)] per encoded image, best first."""
  predictor = Predictor(weights_path, min(batch_size, max(len(images), 1)))
  out = []
  for start in range(0, len(images), predictor.batch_size):
    chunk = images[start:start + predictor.batch_size]
    out += predictor.top([preprocess(img, predictor.preprocessing) for img in chunk], top)
  return out


def expand_inputs(paths: list[str]) -> list[tuple[str, str | None]]:
  """[(path, None) per image to predict, or (path, why it cannot be)]: files as given,
  directories as their image files (recursive, sorted; names starting with "." left out)."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
      if not found:
        out.append((path, f"a directory without image files ({', '.join(IMAGE_SUFFIXES)})"))
      out += [(f, None) for f in sorted(found)]
    elif not os.path.exists(path):
      out.append((path, "no such file"))
    else:
      out.append((path, None))
  return out


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _format(path: str, classes, probs, predictor: Predictor, as_json: bool) -> str:
  if as_json:
    return json.dumps({"path": path, "top": [
        {"index": c, "name": predictor.name(c), "probability": p}
        for c, p in zip(classes, probs)]})
  def entry(c, p):
    name = predictor.name(c)
    return f"{c} {name} {p:.3f}" if name is not None else f"{c} {p:.3f}"
  return f"{path}  " + "  ".join(entry(c, p) for c, p in zip(classes, probs))


def _fail(path: str, why: str) -> None:
  print(f"predict: error: {path}: {why}", file=sys.stderr, flush=True)


def run(weights: str, inputs: list[str], *, top: int = 5,
        batch_size: int = DEFAULT_BATCH_SIZE, as_json: bool = False) -> int:
  """The command: returns its exit code (see the module's docstring)."""
  items = expand_inputs(inputs)
  good = sum(why is None for _, why in items)
  predictor = Predictor(weights, min(batch_size, max(good, 1)))
  failed = 0
  pending: list[tuple[str, object]] = []

  def flush():
    if pending:
      results = predictor.top([image for _, image in pending], top)
      for (path, _), (classes, probs) in zip(pending, results):
        print(_format(path, classes, probs, predictor, as_json), flush=True)
      pending.clear()

  for path, why in items:
    if why is None:
      try:
        encoded = _read(path)
      except OSError as e:
        why = f"cannot read it ({e.strerror or type(e).__name__})"
    if why is None:
      try:
        image = preprocess(encoded, predictor.preprocessing)
      except Exception as e:  # noqa: BLE001 -- TF's decode errors: name the file
        why = f"cannot decode it as an image ({_first_line(e)})"
    if why is not None:
      failed += 1
      _fail(path, why)
      continue
    pending.append((path, image))
    if len(pending) == predictor.batch_size:
      flush()
  flush()
  return 1 if failed else 0


def _first_line(error: Exception) -> str:
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  text = lines[0] if lines else type(error).__name__
  text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)   # TF's op prefix ...
  text = text.split(" [Op:")[0]                                   # ... and suffix
  return text[:200]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m resnet_jax.predict", description=__doc__.splitlines()[0],
      epilog="Exit codes: 0 all predicted; 1 some input unreadable or undecodable (each named "
             "on stderr, the others predicted); 2 bad usage or weights file.")
  p.add_argument("--weights", required=True, help="a resnet_jax .safetensors weights file")
  p.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
  p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                 help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
  p.add_argument("--json", action="store_true",
                 help="one JSON object per image on stdout: path, top classes (index, name, "
                      "probability)")
  p.add_argument("inputs", nargs="+", metavar="INPUT",
                 help="image files (JPEG, PNG, BMP, GIF) or directories of them")
  args = p.parse_args(argv)
  if args.top < 1:
    p.error(f"--top must be at least 1, got {args.top}")
  if args.batch_size < 1:
    p.error(f"--batch-size must be at least 1, got {args.batch_size}")
  try:
    return run(args.weights, args.inputs, top=args.top, batch_size=args.batch_size,
               as_json=args.json)
  except ValueError as e:
    print(f"predict: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
