"""model.pretrained: a fresh run starts from a resnet_jax weights file; the head is
re-initialised when the class count differs; a resumed run continues from its own
checkpoint; a file that does not fit is one line naming the key, the file and the culprit.

Runs use learning rate 0 and one step, so the saved state shows what training started from:
params unchanged, BN statistics moved by (1 - bn_momentum) = 1e-6 of a batch's.
"""

import json
import re

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf

from resnet_jax import config_cli, models
from resnet_jax import main as cli
from resnet_jax.config_schema import check_values
from resnet_jax.convert import weights_file
from resnet_jax.training import pretrained, state as state_lib
from resnet_jax.training import trainer

from conftest import DEFAULT_CONFIG, read_checkpoint, run_cli

MODEL, SIZE = "resnet8", 16
PRE = dict(image_size=32, crop_pct=0.9, interpolation="bilinear", channel_order="BGR",
           mean=[104.0, 117.0, 123.0], std=[57.0, 57.5, 58.0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """10 classes of 16x16 RGB images (train 8 / test 2 each): a 3-channel dataset, as
  ImageNet-style weights need (the digits are greyscale)."""
  root = tmp_path_factory.mktemp("rgb_images")
  rng = np.random.default_rng(0)
  for split, count in (("train", 8), ("test", 2)):
    for cls in range(10):
      (root / split / str(cls)).mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        (root / split / str(cls) / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
  return str(root)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _random_variables(num_classes, seed=0):
  """Every leaf random, none equal to a fresh init (BN variances positive)."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(
      draw, weights_file.abstract_variables(MODEL, num_classes))


def _save(path, num_classes, model=MODEL):
  """Random weights of MODEL (zeros of another model) in a weights file with PRE."""
  if model == MODEL:
    variables = _random_variables(num_classes)
  else:
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             weights_file.abstract_variables(model, num_classes))
  weights_file.save(str(path), variables, model, PRE, source="test")
  return variables


def _overrides(folder, tfds_dir, pretrained, **extra):
  return {"data.dataset": "image_folder", "data.image_folder": folder,
          "data.image_size": SIZE, "data.data_dir": tfds_dir, "data.crop_padding": 0,
          "data.batch_size": 32, "model.name": MODEL, "model.pretrained": str(pretrained),
          "model.bn_momentum": 0.999999, "optimizer.learning_rate": 0.0,
          # Stopped after step 1 of 3: saved, and no eval to compile.
          "num_train_steps": 3, "stop_after_steps": 1, "eval_every_epochs": 100,
          "log_every_steps": 1, **extra}


def _config(overrides, settled=None):
  """The resolved config, as the command line resolves it; `settled` (a list) receives the
  lines saying what was taken from the file."""
  cfg, lines = config_cli.resolve(DEFAULT_CONFIG, {k: str(v) for k, v in overrides.items()})
  check_values(cfg, num_devices=jax.device_count(), num_processes=1)
  if settled is not None:
    settled.extend(lines)
  return cfg


def _assert_equal_except_head(saved, file_params, *, exact=True):
  flat_saved = dict(jax.tree_util.tree_leaves_with_path(saved))
  flat_file = dict(jax.tree_util.tree_leaves_with_path(file_params))
  body = [k for k in flat_file if "head" not in jax.tree_util.keystr(k)]
  assert body and set(body) <= set(flat_saved)
  for key in body:
    if exact:
      np.testing.assert_array_equal(flat_saved[key], flat_file[key],
                                    err_msg=jax.tree_util.keystr(key))
    else:
      np.testing.assert_allclose(flat_saved[key], flat_file[key], rtol=1e-5, atol=1e-4,
                                 err_msg=jax.tree_util.keystr(key))


def test_run_starts_from_the_file_and_a_resumed_run_from_its_checkpoint(
    folder, tfds_dir, tmp_path, capsys):
  path = tmp_path / "w.safetensors"
  variables = _save(path, num_classes=10)
  workdir = str(tmp_path / "work")
  # Stopped after one step: the rerun must resume, not start from the file again.
  overrides = _overrides(folder, tfds_dir, path)
  settled = []
  cfg = _config(overrides, settled)
  # Settled when the config is resolved, before the run: the file's preprocessing.
  assert settled == [f"model.pretrained: data.channel_order=BGR data.mean=(104.0, 117.0, "
                     f"123.0) data.std=(57.0, 57.5, 58.0) taken from {path}"]
  assert tuple(cfg.data.std) == (57.0, 57.5, 58.0) and cfg.data.channel_order == "BGR"
  given = cfg.to_json()
  assert trainer.train_and_evaluate(cfg, workdir) == {"step": 1, "stopped": True}
  assert cfg.to_json() == given, "the trainer leaves the config it is given as it was"
  out = capsys.readouterr().out
  assert f"model.pretrained: 37 arrays from {path} (test)" in out, out
  assert f"{path} was made for image_size 32 (this run: 16); keeping the config's" in out
  assert "re-initialised" not in out
  recorded = json.load(open(f"{workdir}/config.json"))["data"]
  assert recorded["mean"] == PRE["mean"] and recorded["channel_order"] == "BGR"

  state = read_checkpoint(workdir, 1)
  # learning rate 0: the params after one step are the ones training started from.
  _assert_equal_except_head(state["params"], variables["params"])
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(state["params"]["head"][k], variables["params"]["head"][k])
  # BN statistics moved by 1e-6 of a batch's.
  _assert_equal_except_head(state["batch_stats"], variables["batch_stats"], exact=False)

  settled = []
  resumed = trainer.train_and_evaluate(_config(dict(overrides, stop_after_steps=2), settled),
                                       workdir)
  assert resumed == {"step": 2, "stopped": True}
  out = capsys.readouterr().out
  assert "resumed from" in out and "arrays from" not in out, out
  # The resumed run normalises as the first did: the file's preprocessing again.
  assert "data.channel_order=BGR data.mean=(104.0, 117.0, 123.0)" in settled[0]


def test_head_is_reinitialised_when_the_class_count_differs(folder, tfds_dir, tmp_path,
                                                             capsys):
  path = tmp_path / "five.safetensors"
  variables = _save(path, num_classes=5)
  workdir = str(tmp_path / "work")
  settled = []
  cfg = _config(_overrides(folder, tfds_dir, path, **{
      "data.mean": "1,2,3", "data.std": "4,5,6", "optimizer.ema_decay": 0.5}), settled)
  assert trainer.train_and_evaluate(cfg, workdir) == {"step": 1, "stopped": True}
  out = capsys.readouterr().out
  assert "model.pretrained: classifier head re-initialised (5 -> 10 classes)" in out, out
  assert f"model.pretrained: 35 arrays from {path}" in out
  # The config's mean/std are kept; the weights' channel order is taken (it was default).
  assert settled == [f"model.pretrained: data.channel_order=BGR taken from {path} (the "
                     "config's data.mean/std are read in that order)"]
  recorded = json.load(open(f"{workdir}/config.json"))["data"]
  assert recorded["mean"] == [1.0, 2.0, 3.0] and recorded["channel_order"] == "BGR"
  state = read_checkpoint(workdir, 1)
  _assert_equal_except_head(state["params"], variables["params"])
  # The EMA copies start from the loaded arrays too (not from the fresh init).
  _assert_equal_except_head(state["ema_params"], variables["params"], exact=False)
  _assert_equal_except_head(state["ema_batch_stats"], variables["batch_stats"], exact=False)
  fresh = jax.jit(state_lib.make_init_fn(models.create(MODEL, num_classes=10), optax.sgd(0.0),
                                         (1, SIZE, SIZE, 3), seed=0))().params["head"]
  assert state["params"]["head"]["kernel"].shape == (64, 10)
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(state["params"]["head"][k], fresh[k])


def _argv(overrides, workdir):
  return [f"--config={DEFAULT_CONFIG}", *[f"--config.{k}={v}" for k, v in overrides.items()],
          f"--workdir={workdir}"]


def test_files_that_do_not_fit_are_one_line_errors(folder, tfds_dir, data_dir, tmp_path,
                                                    capsys):
  resnet20 = tmp_path / "resnet20.safetensors"
  _save(resnet20, 10, model="resnet20")
  text = tmp_path / "notes.safetensors"
  text.write_text("not weights")
  ours = tmp_path / "resnet8.safetensors"
  _save(ours, 10)
  cases = [  # (pretrained, extra overrides, texts the error line must contain)
      (resnet20, {}, ["resnet20 weights", "'model.name' is 'resnet8'"]),
      (tmp_path / "absent.safetensors", {}, ["no such file"]),
      (text, {}, ["not a safetensors file"]),
      # A model configured differently from the file's: the first missing array is named.
      (ours, {"model.se_ratio": 0.25}, ["has no params/stage1_block1/se/", "as configured"]),
      # The digits are greyscale: the stem of RGB weights does not fit.
      (ours, {"data.dataset": "sklearn_digits", "data.data_dir": data_dir,
              "data.batch_size": 64},
       ["params/stem_conv/kernel has shape (3, 3, 3, 16)", "(3, 3, 1, 16)",
        "the data has 1 channel(s)"]),
  ]
  for i, (pretrained, extra, expected) in enumerate(cases):
    workdir = tmp_path / f"work{i}"
    code = cli.main(_argv(dict(_overrides(folder, tfds_dir, pretrained), **extra), workdir))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    # (stderr may also hold TFDS's progress bars the first time a dataset is prepared)
    assert code == 2 and captured.err.count("error") == 1, captured.err
    assert "Traceback" not in captured.err
    line = err[-1]
    assert line.startswith("resnet_jax: error: config key 'model.pretrained': ")
    assert str(pretrained) in line and all(e in line for e in expected), line
    # Refused before anything is written.
    assert not (workdir / "config.json").exists() and not (workdir / "metrics.jsonl").exists()
    assert not list((workdir / "checkpoints").glob("*"))


def test_loaded_arrays_take_the_states_shardings(folder, tfds_dir, tmp_path):
  """Two devices with fsdp=2: the larger kernels are split over them, the rest replicated;
  the loaded values land whole and in place either way."""
  path = tmp_path / "w.safetensors"
  variables = _save(path, num_classes=10)
  workdir = str(tmp_path / "work")
  proc = run_cli(_argv(_overrides(folder, tfds_dir, path, **{"mesh.fsdp": 2}), workdir),
                 devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 devices on 1 process" in proc.stdout and "37 arrays from" in proc.stdout
  held, total = (int(g.replace(",", "")) for g in re.search(
      r"params take ([\d,]+) of ([\d,]+) bytes", proc.stdout).groups())
  assert held < total, "fsdp=2 splits the larger kernels"
  state = read_checkpoint(workdir, 1)
  _assert_equal_except_head(state["params"], variables["params"])
  np.testing.assert_array_equal(state["params"]["head"]["kernel"],
                                variables["params"]["head"]["kernel"])


def test_a_headless_file_gets_a_fresh_head(tmp_path, capsys):
  path = str(tmp_path / "backbone.safetensors")
  backbone = _random_variables(num_classes=0)
  weights_file.save(path, backbone, MODEL, PRE, source="test")
  model = models.create(MODEL, num_classes=10)
  abstract = jax.eval_shape(state_lib.make_init_fn(model, optax.sgd(0.0), (1, SIZE, SIZE, 3), 0))
  loaded = pretrained.load_variables(path, abstract, num_classes=10, model_name=MODEL,
                                     channels=3)
  assert "classifier head re-initialised (the file has none; 10 classes)" in (
      capsys.readouterr().out)
  assert loaded["params"][("head", "kernel")] is None
  np.testing.assert_array_equal(loaded["params"][("stem_conv", "kernel")],
                                backbone["params"]["stem_conv"]["kernel"])


def test_eval_only_scores_the_starting_weights_without_training_or_saving(
    folder, tfds_dir, tmp_path, capsys):
  """eval_only evaluates what a run would start from: the workdir's latest checkpoint
  (exactly the metrics that run's own final evaluation logged) or, in a fresh workdir,
  model.pretrained. Nothing is trained and no checkpoint is written."""
  path = tmp_path / "w.safetensors"
  _save(path, num_classes=10)
  trained = str(tmp_path / "trained")
  overrides = _overrides(folder, tfds_dir, path, num_train_steps=1, stop_after_steps=-1)
  final = trainer.train_and_evaluate(_config(overrides), trained)
  assert final["step"] == 1 and final["examples"] == 20

  again = trainer.train_and_evaluate(_config(dict(overrides, eval_only=True)), trained)
  assert "resumed from" in capsys.readouterr().out
  assert again["eval_only"] and again["step"] == 1
  for key in ("top1", "loss", "examples"):
    assert again[key] == final[key], key     # the same state through the same eval step

  fresh = tmp_path / "fresh"
  code = cli.main(_argv(dict(overrides, eval_only=True), fresh))
  out = capsys.readouterr().out
  assert code == 0 and "37 arrays from" in out and "no training" in out, out
  assert not (fresh / "results.json").exists()        # eval results go to their own file
  scored = json.load(open(fresh / "eval_test_step0.json"))
  assert scored["eval_only"] and scored["step"] == 0 and scored["examples"] == 20
  # The file's weights; the trained run's differ only by BN statistics moved 1e-6.
  np.testing.assert_allclose(scored["loss"], final["loss"], rtol=1e-4)
  assert not list((fresh / "checkpoints").glob("*"))
