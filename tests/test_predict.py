"""`python -m resnet_jax.predict`: the printed top-k is the model's softmax on the image
preprocessed as the weights file says (size, crop, interpolation, channel order, mean/std);
batches of any size give the same results; directories expand to their images; an image
that cannot be read or decoded is named in one line while the others are still predicted
(exit 1); a bad weights file gives one line and exit code 2; --json parses."""

import json
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
  """{image path: [(class, probability)]} from predict's stdout: `PATH  C [NAME] P  ...`."""
  rows = {}
  for line in out.strip().splitlines():
    path, *ranked = line.split("  ")
    rows[path] = [(int(r.split()[0]), float(r.split()[-1])) for r in ranked]
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
  # A missing image: named alone, the others still predicted, exit 1.
  assert predict.main(["--weights", weights, image, missing]) == 1
  captured = capsys.readouterr()
  assert list(_printed(captured.out)) == [image]
  assert captured.err.strip() == f"predict: error: {missing}: no such file"

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
  assert predict.main(["--weights", weights, str(not_image)]) == 1
  assert str(not_image) in _one_error_line(capsys)

  for flag in ("--batch-size", "--top"):
    with pytest.raises(SystemExit) as e:
      predict.main(["--weights", weights, flag, "0", image])
    assert e.value.code == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def _json_rows(out):
  return [json.loads(line) for line in out.strip().splitlines()]


def test_batch_size_does_not_change_the_results(variables, tmp_path, capsys):
  """10 images through batches of 1, of 7 (7 + a padded 3) and of the default (one padded
  batch): the same classes in the same order, the same probabilities."""
  weights = _weights(tmp_path, variables)
  images = [_write(tmp_path / f"img{i:02d}.jpg", _image(i, 60 + 7 * i, 90 - 3 * i))
            for i in range(10)]
  runs = {}
  for batch in ("1", "7", None):
    flags = ["--batch-size", batch] if batch else []
    assert predict.main(["--weights", weights, "--json", "--top", "10", *flags, *images]) == 0
    rows = _json_rows(capsys.readouterr().out)
    assert [r["path"] for r in rows] == images
    runs[batch] = rows
  for batch in ("7", None):
    for one, other in zip(runs["1"], runs[batch]):
      assert [t["index"] for t in one["top"]] == [t["index"] for t in other["top"]]
      np.testing.assert_allclose([t["probability"] for t in one["top"]],
                                 [t["probability"] for t in other["top"]], rtol=1e-5,
                                 atol=1e-7)
  # ... and they are the model's: each image's probabilities as computed here.
  for path, row in zip(images, runs["7"]):
    probs = _direct(variables, path, PRE)
    assert [t["index"] for t in row["top"]] == list(np.argsort(-probs))
    np.testing.assert_allclose([t["probability"] for t in row["top"]], np.sort(probs)[::-1],
                               rtol=1e-5, atol=1e-7)


def test_a_directory_is_its_image_files_sorted_and_recursive(variables, tmp_path, capsys):
  weights = _weights(tmp_path, variables)
  root = tmp_path / "photos"
  (root / "b").mkdir(parents=True)
  (root / "a" / "deep").mkdir(parents=True)
  expected = [_write(root / "a" / "deep" / "x.png", _image(1), "png"),
              _write(root / "a" / "z.JPG", _image(2)),
              _write(root / "b" / "y.jpeg", _image(3)),
              _write(root / "c.jpg", _image(4))]
  (root / "notes.txt").write_text("not an image, not an image name: left out")
  _write(root / "._c.jpg", _image(5))             # a hidden file (macOS metadata): left out
  single = _write(tmp_path / "single.jpg", _image(6))
  assert predict.main(["--weights", weights, "--batch-size", "3", str(root), single]) == 0
  captured = capsys.readouterr()
  assert list(_printed(captured.out)) == expected + [single] and captured.err == ""
  empty = tmp_path / "empty"
  empty.mkdir()
  assert predict.main(["--weights", weights, str(empty), single]) == 1
  captured = capsys.readouterr()
  assert list(_printed(captured.out)) == [single]
  assert captured.err.startswith(f"predict: error: {empty}: a directory without image files")


def test_a_corrupt_file_is_named_alone_and_the_others_predicted(variables, tmp_path, capsys):
  weights = _weights(tmp_path, variables)
  folder = tmp_path / "mixed"
  folder.mkdir()
  good = [_write(folder / f"{name}.jpg", _image(i)) for i, name in enumerate("abde")]
  corrupt = folder / "c.jpg"
  corrupt.write_bytes(open(good[0], "rb").read()[:200])      # a JPEG cut short
  truncated_png = folder / "f.png"
  truncated_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
  assert predict.main(["--weights", weights, "--batch-size", "2", str(folder)]) == 1
  captured = capsys.readouterr()
  assert list(_printed(captured.out)) == good
  err = captured.err.strip().splitlines()
  assert len(err) == 2 and "Traceback" not in captured.err, captured.err
  for line, bad in zip(err, (corrupt, truncated_png)):
    assert line.startswith(f"predict: error: {bad}: cannot decode it as an image")
    assert not any(g in line for g in good)
  # The good images' results are the ones they get on their own.
  assert predict.main(["--weights", weights, *good]) == 0
  assert _printed(capsys.readouterr().out) == _printed(captured.out)


def test_names_come_from_the_file_else_imagenet_else_none(variables, tmp_path, capsys):
  names = [f"class {chr(65 + i)}" for i in range(CLASSES)]       # names may hold spaces
  weights = str(tmp_path / "named.safetensors")
  weights_file.save(weights, variables, MODEL, PRE, source="test", class_names=names)
  image = _write(tmp_path / "img.jpg", _image())
  assert predict.main(["--weights", weights, "--json", "--top", "3", image]) == 0
  row, = _json_rows(capsys.readouterr().out)
  assert row["path"] == image and len(row["top"]) == 3
  assert [t["name"] for t in row["top"]] == [names[t["index"]] for t in row["top"]]
  assert predict.main(["--weights", weights, "--top", "2", image]) == 0
  line = capsys.readouterr().out.strip()
  c0, c1 = (t["index"] for t in row["top"][:2])
  p0, p1 = (t["probability"] for t in row["top"][:2])
  assert line == f"{image}  {c0} {names[c0]} {p0:.3f}  {c1} {names[c1]} {p1:.3f}"
  # Without names in the file: the index alone (null in JSON).
  assert predict.main(["--weights", _weights(tmp_path, variables), "--json", image]) == 0
  assert all(t["name"] is None for t in _json_rows(capsys.readouterr().out)[0]["top"])
  # 1000 classes: ImageNet's, from the label file TFDS ships (WordNet ids, index order).
  imagenet = predict.imagenet_class_names()
  assert len(imagenet) == 1000 and imagenet[0] == "n01440764" and imagenet[-1] == "n15075141"
  assert predict.class_names({"num_classes": 1000}) == imagenet
  assert predict.class_names({"num_classes": 1000, "class_names": names}) == names
  assert predict.class_names({"num_classes": 10}) is None


def test_greyscale_and_squash_preprocessing(tmp_path):
  """A 1-channel model's input: the image decoded as greyscale; "resize": "squash" (an
  image folder prepared for a cifar-style run): the whole image resized, not cropped."""
  import tensorflow as tf
  grey = _image(7, 8, 8)[..., :1]
  path = _write(tmp_path / "grey.png", grey, "png")
  pre = dict(PRE, image_size=8, crop_pct=1.0, mean=[78.0], std=[96.0])
  x = predict.preprocess(open(path, "rb").read(), pre)
  np.testing.assert_array_equal(x, (grey.astype(np.float32) - 78) / 96)
  wide = _image(8, 40, 70)
  path = _write(tmp_path / "wide.png", wide, "png")
  squash = dict(PRE, image_size=16, crop_pct=1.0, resize="squash")
  resized = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(wide, (16, 16),
                                                              antialias=True)), 0, 255),
                    tf.uint8).numpy()
  np.testing.assert_array_equal(predict.preprocess(open(path, "rb").read(), squash),
                                (resized - np.float32(PRE["mean"])) / np.float32(PRE["std"]))
  # The same file and size, cropped: a center square, not the squashed whole.
  cropped = predict.preprocess(open(path, "rb").read(), dict(squash, resize="crop"))
  assert cropped.shape == (16, 16, 3) and np.abs(cropped - predict.preprocess(
      open(path, "rb").read(), squash)).max() > 0.1
