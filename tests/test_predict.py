"""`python -m resnet_jax.predict`: the printed top-k is the model's softmax on the image
preprocessed as the weights file says (size, crop, interpolation, channel order, mean/std);
bad input gives one line and exit code 2."""

import re

import jax
import numpy as np
import pytest
import tensorflow as tf

from resnet_jax import models, predict
from resnet_jax.convert import weights_file
from resnet_jax.data import imagenet_preprocess

MODEL, CLASSES = "resnet8", 10          # small and quick; predict takes any registered model
PRE = dict(image_size=32, crop_pct=0.875, interpolation="bilinear", channel_order="RGB",
           mean=[120.0, 110.0, 100.0], std=[60.0, 55.0, 50.0])


@pytest.fixture(scope="module")
def variables():
  """Initialised params and non-trivial BN statistics: spread-out probabilities."""
  model = models.create(MODEL, num_classes=CLASSES)
  v = jax.jit(model.init)(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(0)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.uniform(0.5, 2.0, x.shape) if jax.tree_util.keystr(p).endswith(
          "['var']") else rng.normal(0, 0.3, x.shape)).astype(np.float32), v["batch_stats"])
  return {"params": jax.device_get(v["params"]), "batch_stats": stats}


def _image(seed=0, height=80, width=100):
  """A gradient plus noise: every channel different, nothing symmetric."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7 + y / 11)], -1)
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _write(path, image, fmt="jpeg"):
  encode = tf.io.encode_jpeg if fmt == "jpeg" else tf.io.encode_png
  path.write_bytes(encode(image).numpy())
  return str(path)


def _weights(tmp_path, variables, name="w.safetensors", **pre):
  path = str(tmp_path / name)
  weights_file.save(path, variables, MODEL, dict(PRE, **pre), source="test")
  return path


def _direct(variables, image_path, pre):
  """Probabilities computed here, step by step, without predict.py."""
  image = imagenet_preprocess.eval_image(
      open(image_path, "rb").read(), pre["image_size"], crop_pct=pre["crop_pct"],
      antialias=True, interpolation=pre["interpolation"], channel_order=pre["channel_order"])
  x = (np.asarray(image, np.float32) - np.float32(pre["mean"])) / np.float32(pre["std"])
  logits = models.create(MODEL, num_classes=CLASSES).apply(variables, x[None], train=False)
  return np.asarray(jax.nn.softmax(logits, axis=-1))[0]


def _printed(out):
  """{image path: [(class, probability)]} from predict's stdout."""
  rows = {}
  for line in out.strip().splitlines():
    path, *ranked = line.split()
    rows[path] = [(int(c), float(p)) for c, p in (r.split(":") for r in ranked)]
  return rows


def test_printed_top_k_is_the_models_softmax(variables, tmp_path, capsys):
  weights = _weights(tmp_path, variables)
  images = [_write(tmp_path / f"img{i}.jpg", _image(i)) for i in range(2)]
  assert predict.main(["--weights", weights, "--top", "3", *images]) == 0
  printed = _printed(capsys.readouterr().out)
  assert list(printed) == images
  for path in images:
    probs = _direct(variables, path, PRE)
    order = np.argsort(-probs)
    assert [c for c, _ in printed[path]] == list(order[:3])
    np.testing.assert_allclose([p for _, p in printed[path]], probs[order[:3]], atol=5e-4)
    # Full precision through the function behind the CLI.
    (classes, probabilities), = predict.predict(weights, [open(path, "rb").read()], top=10)
    assert classes == list(order)
    np.testing.assert_allclose(probabilities, probs[order], rtol=1e-5, atol=1e-7)
  assert probs.max() < 0.9, "probabilities this peaked would hide an error in the ranking"


def test_bgr_weights_see_the_channel_reversed_image(variables, tmp_path, capsys):
  # PNG: lossless, so the reversed file holds exactly the reversed pixels.
  image = _image(3)
  rgb_file = _write(tmp_path / "rgb.png", image, "png")
  reversed_file = _write(tmp_path / "reversed.png", image[..., ::-1], "png")
  bgr_weights = _weights(tmp_path, variables, "bgr.safetensors", channel_order="BGR")
  rgb_weights = _weights(tmp_path, variables, "rgb.safetensors")
  read = lambda p: [open(p, "rb").read()]  # noqa: E731
  (bgr_classes, bgr_probs), = predict.predict(bgr_weights, read(rgb_file), top=10)
  (rev_classes, rev_probs), = predict.predict(rgb_weights, read(reversed_file), top=10)
  assert bgr_classes == rev_classes
  np.testing.assert_allclose(bgr_probs, rev_probs, rtol=1e-6, atol=1e-7)
  # ... and the order matters: the same image in RGB gives other probabilities.
  (_, rgb_probs), = predict.predict(rgb_weights, read(rgb_file), top=10)
  assert np.abs(np.asarray(rgb_probs) - np.asarray(bgr_probs)).max() > 1e-3
  np.testing.assert_allclose(
      sorted(bgr_probs, reverse=True),
      np.sort(_direct(variables, rgb_file, dict(PRE, channel_order="BGR")))[::-1], rtol=1e-5)


def _one_error_line(capsys):
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert captured.out == "" and len(err) == 1, captured.err
  assert err[0].startswith("predict: error: ") and "Traceback" not in captured.err
  return err[0]


def test_bad_input_one_line_exit_2(variables, tmp_path, capsys):
  weights = _weights(tmp_path, variables)
  image = _write(tmp_path / "ok.jpg", _image())
  missing = str(tmp_path / "no_such.jpg")
  assert predict.main(["--weights", weights, image, missing]) == 2
  assert missing in _one_error_line(capsys)

  text = tmp_path / "weights.safetensors"
  text.write_text("these are not weights\n")
  assert predict.main(["--weights", str(text), image]) == 2
  line = _one_error_line(capsys)
  assert str(text) in line and "not a safetensors file" in line

  foreign = str(tmp_path / "foreign.safetensors")     # a safetensors file, not ours
  weights_file.write_safetensors(foreign, {"fc.weight": np.zeros((2, 2), np.float32)}, {})
  assert predict.main(["--weights", foreign, image]) == 2
  line = _one_error_line(capsys)
  assert foreign in line and "not a resnet_jax weights file" in line

  absent = str(tmp_path / "absent.safetensors")
  assert predict.main(["--weights", absent, image]) == 2
  assert re.search(re.escape(absent) + ".*no such file", _one_error_line(capsys))

  not_image = tmp_path / "notes.jpg"
  not_image.write_text("not an image")
  assert predict.main(["--weights", weights, str(not_image)]) == 2
  assert str(not_image) in _one_error_line(capsys)
