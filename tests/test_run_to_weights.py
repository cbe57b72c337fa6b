"""From a training run to a weights file: `python -m resnet_jax.convert from-run` writes a
run's checkpoint (latest, a step, the best; raw or EMA) with the run's class names and
preprocessing, and `predict` and `export` take it.

One real short run on the digits (resnet8, 16 steps, EMA) serves every test here and
tests/test_evaluate.py (`digits_run`, session-scoped).
"""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from resnet_jax import config_cli, convert, models, predict
from resnet_jax.config_schema import check_keys_and_types, check_values
from resnet_jax.convert import __main__ as cli
from resnet_jax.convert import weights_file
from resnet_jax.data import sklearn_digits
from resnet_jax.training import trainer

from conftest import DEFAULT_CONFIG, copy_without_ema, read_checkpoint

MODEL, STEPS = "resnet8", 16
RUN = {"model.name": MODEL, "num_train_steps": STEPS, "optimizer.ema_decay": 0.9,
       "checkpoint.every_steps": 8, "eval_every_epochs": 100, "log_every_steps": 8,
       "schedule.warmup_epochs": 0}


@pytest.fixture(scope="session")
def digits_run(data_dir, tmp_path_factory):
  """A finished run's workdir: saves at steps 8 and 16, the best at 16, EMA kept."""
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  cfg = config_cli.load_config_file(DEFAULT_CONFIG)
  config_cli.apply_overrides(cfg, {"data.data_dir": data_dir,
                                   **{k: str(v) for k, v in RUN.items()}})
  check_keys_and_types(cfg)
  check_values(cfg, num_devices=jax.device_count(), num_processes=1)
  trainer.train_and_evaluate(cfg, workdir)
  return workdir


def _convert(capsys, *argv):
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out.strip(), captured.err.strip()


def _equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


DIGITS_PRE = {"image_size": 8, "crop_pct": 1.0, "interpolation": "bilinear",
              "channel_order": "RGB", "mean": [78.0], "std": [96.0]}


def test_from_run_writes_the_checkpoints_weights_names_and_preprocessing(digits_run, tmp_path,
                                                                         capsys):
  saved = read_checkpoint(digits_run, STEPS)
  raw, ema = str(tmp_path / "raw.safetensors"), str(tmp_path / "ema.safetensors")
  code, out, err = _convert(capsys, "from-run", digits_run, raw)
  assert code == 0 and err == "", err
  assert out == (f"wrote {raw}: {MODEL}, 10 classes, raw weights of step {STEPS} "
                 f"(checkpoints) of {digits_run}")
  code, out, err = _convert(capsys, "from-run", "--ema", digits_run, ema)
  assert code == 0 and "EMA weights of step 16" in out, err
  for path, names in ((raw, ("params", "batch_stats")),
                      (ema, ("ema_params", "ema_batch_stats"))):
    variables, info = weights_file.load(path)
    _equal_trees(variables, {"params": saved[names[0]], "batch_stats": saved[names[1]]})
    assert info["model"] == MODEL and info["num_classes"] == 10
    assert info["class_names"] == [str(d) for d in range(10)]     # the digits' TFDS labels
    assert info["preprocessing"] == DIGITS_PRE
    assert info["source"].startswith(f"resnet_jax run {digits_run} checkpoints/{STEPS}")
  # EMA with decay 0.9 over 16 steps: other numbers than the raw weights.
  assert not np.array_equal(saved["params"]["head"]["kernel"],
                            saved["ema_params"]["head"]["kernel"])
  # --step and --best pick those saves.
  code, out, _ = _convert(capsys, "from-run", "--step", "8", digits_run,
                          str(tmp_path / "s8.safetensors"))
  assert code == 0
  _equal_trees(weights_file.load(str(tmp_path / "s8.safetensors"))[0]["params"],
               read_checkpoint(digits_run, 8)["params"])
  code, out, _ = _convert(capsys, "from-run", "--best", digits_run,
                          str(tmp_path / "best.safetensors"))
  assert code == 0 and f"step {STEPS} (best)" in out
  _equal_trees(weights_file.load(str(tmp_path / "best.safetensors"))[0]["params"],
               saved["params"])
  # The torchvision-layout export of it works.
  tv = str(tmp_path / "tv.safetensors")
  code, out, err = _convert(capsys, "export", raw, tv)
  assert code == 0, err
  exported = convert.read_state_dict(tv)
  np.testing.assert_array_equal(exported["fc.weight"],
                                np.asarray(saved["params"]["head"]["kernel"]).T)
  assert exported["conv1.weight"].shape[1] == 1                 # the 1-channel stem
  assert json.loads(weights_file.read_header(tv)["class_names"]) == info["class_names"]


def test_from_run_errors_are_one_line(digits_run, tmp_path, capsys):
  out_path = str(tmp_path / "w.safetensors")
  code, out, err = _convert(capsys, "from-run", "--step", "5", digits_run, out_path)
  assert code == 2 and out == "" and "\n" not in err
  held = ", ".join(map(str, convert.run_checkpoint_steps(digits_run)))
  assert held.endswith("8, 16")
  assert err == (f"convert: error: {digits_run}: no checkpoint at step 5 in checkpoints/ "
                 f"(it holds step(s) {held})")
  empty = tmp_path / "empty_run"
  empty.mkdir()
  code, _, err = _convert(capsys, "from-run", str(empty), out_path)
  assert code == 2 and "\n" not in err and f"{empty}: no checkpoints in checkpoints/" in err
  # A run without EMA: the same checkpoints, its config saying ema_decay 0.
  no_ema = copy_without_ema(digits_run, tmp_path / "no_ema")
  code, _, err = _convert(capsys, "from-run", "--ema", no_ema, out_path)
  assert code == 2 and "\n" not in err
  assert err == (f"convert: error: {no_ema}: --ema, but the run kept no EMA of its weights "
                 "(optimizer.ema_decay=0.0)")
  assert not os.path.exists(out_path)


def test_class_names_fall_back_to_indices_in_one_line(digits_run, tmp_path, monkeypatch,
                                                      capsys):
  # Labels that do not fit the head: indices instead, said in one line.
  monkeypatch.setattr(convert, "dataset_labels", lambda config: (["a", "b"], (8, 8, 1), ""))
  path = str(tmp_path / "w.safetensors")
  code, out, err = _convert(capsys, "from-run", digits_run, path)
  assert code == 0 and out.startswith(f"wrote {path}")
  assert err == ("convert: note: class names of sklearn_digits not available (2 labels for "
                 "a 10-class head); stored 0..9")
  info = weights_file.read_info(path)
  assert info["class_names"] == [str(i) for i in range(10)]
  assert info["preprocessing"] == DIGITS_PRE
  # No dataset info at all: the names fall back the same way; a cifar-style run's image
  # size then cannot be told (data.image_size unset): one line, no file.
  def unavailable(config):
    raise ValueError("dataset gone")
  monkeypatch.setattr(convert, "dataset_labels", unavailable)
  os.remove(path)
  code, out, err = _convert(capsys, "from-run", digits_run, path)
  assert code == 2 and out == "" and "\n" not in err
  assert err.endswith("cannot tell the image size the run's model takes (sklearn_digits's "
                      "info is not available)")
  assert not os.path.exists(path)


def _digit_files(folder, count):
  """The first `count` test digits as 8x8 greyscale PNGs, as the run's dataset stores them;
  (paths, uint8 images)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  index = sklearn_digits.split_indices(digits.target)["test"][:count]
  images = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  folder.mkdir()
  paths = []
  for i, image in enumerate(images):
    paths.append(str(folder / f"digit{i:02d}.png"))
    with open(paths[-1], "wb") as f:
      f.write(tf.io.encode_png(image).numpy())
  return paths, images


def test_predict_on_the_runs_weights_is_the_model_applied_here(digits_run, tmp_path, capsys):
  weights = str(tmp_path / "run.safetensors")
  assert cli.main(["from-run", digits_run, weights]) == 0
  capsys.readouterr()
  paths, images = _digit_files(tmp_path / "digits", 12)
  saved = read_checkpoint(digits_run, STEPS)
  model = models.create(MODEL, num_classes=10)
  logits = model.apply({"params": saved["params"], "batch_stats": saved["batch_stats"]},
                       (images.astype(np.float32) - 78.0) / 96.0, train=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  assert predict.main(["--weights", weights, "--json", "--batch-size", "5",
                       str(tmp_path / "digits")]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["path"] for r in rows] == paths
  for row, p in zip(rows, probs):
    assert row["top"][0]["index"] == int(np.argmax(p))
    assert row["top"][0]["name"] == str(row["top"][0]["index"])
    np.testing.assert_allclose([t["probability"] for t in row["top"]], np.sort(p)[::-1][:5],
                               rtol=1e-4, atol=1e-6)
  # 16 steps learn something (chance: 0.1), so the ranking is not a near-tie everywhere.
  assert probs.max(axis=-1).mean() > 0.2 and len(set(np.argmax(probs, -1))) > 2
  # Text output: index, the digit's name, probability.
  assert predict.main(["--weights", weights, "--top", "1", paths[0]]) == 0
  top = rows[0]["top"][0]
  assert capsys.readouterr().out.strip() == \
      f"{paths[0]}  {top['index']} {top['name']} {top['probability']:.3f}"


def test_names_and_preprocessing_of_other_datasets(tmp_path):
  """Without a run: an image folder's class names are its folders; an ImageNet run's, TFDS's
  ILSVRC2012 labels; a dataset whose names come with its download (cifar10), not prepared:
  none (from-run then stores the indices and says so). Nothing is prepared or written."""
  from resnet_jax.config_schema import base_config
  data_dir = str(tmp_path / "tfds")
  folder = tmp_path / "pets"
  for split, cls in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("train", "emu")):
    (folder / split / cls).mkdir(parents=True, exist_ok=True)
    with open(folder / split / cls / "x.png", "wb") as f:
      f.write(tf.io.encode_png(np.zeros((4, 6, 3), np.uint8)).numpy())
  cfg = base_config()
  cfg.data.data_dir, cfg.data.dataset = data_dir, "image_folder"
  cfg.data.image_folder, cfg.data.image_size = str(folder), 16
  assert convert.dataset_labels(cfg) == (["cat", "dog", "emu"], (16, 16, 3), "")
  assert convert.run_preprocessing(cfg, (16, 16, 3)) == {
      "image_size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "resize": "squash",
      "channel_order": "RGB", "mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]}

  cfg = base_config()
  cfg.data.data_dir, cfg.data.dataset, cfg.data.preprocess = data_dir, "imagenet2012", "imagenet"
  cfg.data.image_size, cfg.data.eval_image_size, cfg.data.crop_pct = 176, 224, 0.95
  cfg.data.interpolation, cfg.data.channel_order = "bicubic", "BGR"
  names, _, why = convert.dataset_labels(cfg)
  assert names == predict.imagenet_class_names() and why == ""
  assert convert.run_preprocessing(cfg, None) == {
      "image_size": 224, "crop_pct": 0.95, "interpolation": "bicubic", "channel_order": "BGR",
      "mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395]}
  cfg.data.dataset = "cifar10"
  assert convert.dataset_labels(cfg) == (None, (32, 32, 3), f"not prepared in {data_dir}")
  assert not os.path.exists(data_dir)
