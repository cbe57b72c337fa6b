"""A user's image folder through TFDS: real digit scans written as JPEG files, plus corrupt
ones that must be skipped and counted (or, by config, stop the run naming the file)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from resnet_jax import main as cli
from resnet_jax.data import image_folder

from conftest import DEFAULT_CONFIG, SHARED_DATA, read_metrics

CORRUPT = ["train/3/truncated.jpg", "train/7/not_an_image.jpg"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from sklearn.datasets import load_digits
  root = tmp_path_factory.mktemp("user_images")
  digits = load_digits()
  rng = np.random.RandomState(0)
  order = rng.permutation(len(digits.target))[:400]
  for i, idx in enumerate(order):
    split = "test" if i % 5 == 0 else "train"
    image = np.round(digits.images[idx] * 255 / 16).astype(np.uint8)
    rgb = np.repeat(np.kron(image, np.ones((2, 2), np.uint8))[..., None], 3, axis=-1)  # 16x16
    path = root / split / str(digits.target[idx]) / f"{idx:04d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_jpeg(rgb, quality=95).numpy())
  good = (root / "train" / "3").iterdir().__next__().read_bytes()
  (root / CORRUPT[0]).write_bytes(good[: len(good) // 3])
  (root / CORRUPT[1]).write_bytes(b"this is a text file with a .jpg name")
  return str(root)


def _argv(folder, tmp_path, *extra):
  return [f"--config={DEFAULT_CONFIG}", "--config.data.dataset=image_folder",
          f"--config.data.image_folder={folder}", "--config.data.image_size=16", f"--config.data.data_dir={tmp_path}/tfds",
          "--config.model.name=resnet8", "--config.num_train_steps=20",
          "--config.data.batch_size=32", "--config.eval_every_epochs=100",
          f"--workdir={tmp_path}/work", *extra]


def test_corrupt_files_are_skipped_and_counted(folder, tmp_path, capsys):
  code = cli.main(_argv(folder, tmp_path))
  out = capsys.readouterr().out
  assert code == 0
  assert "2 corrupt image file(s) skipped" in out
  meta_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "tfds") for f in fs
                if f == "metadata.json"]
  listed = json.load(open(meta_files[0]))["skipped_files"]
  assert sorted(p.split("user_images0/")[-1] for p in listed) == sorted(CORRUPT)
  # Prepared once: a second run reads the same count from the stored metadata.
  assert cli.main(_argv(folder, tmp_path)) == 0
  assert "2 corrupt image file(s) skipped" in capsys.readouterr().out
  results = json.load(open(tmp_path / "work" / "results.json"))
  assert results["examples"] == 80                       # every test image, once
  assert read_metrics(str(tmp_path / "work"))[-1]["step"] == 20


def test_corrupt_files_can_stop_the_run_naming_the_file(folder, tmp_path, capsys):
  code = cli.main(_argv(folder, tmp_path, "--config.data.corrupt_images=error"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert "corrupt image file" in err[-1] and ("truncated.jpg" in err[-1] or
                                               "not_an_image.jpg" in err[-1]), err


def test_tar_archives_are_read_like_folders(tmp_path):
  import tarfile
  src = tmp_path / "src"
  (src / "train" / "a").mkdir(parents=True)
  (src / "train" / "b").mkdir(parents=True)
  for cls, value in (("a", 10), ("b", 200)):
    img = np.full((4, 4, 3), value, np.uint8)
    (src / "train" / cls / "x.png").write_bytes(tf.io.encode_png(img).numpy())
  archive_root = tmp_path / "archived"
  archive_root.mkdir()
  with tarfile.open(archive_root / "train.tar", "w") as tar:
    tar.add(src / "train", arcname="train")
  assert image_folder.find_splits(str(archive_root)) == ["train"]
  items = image_folder._list_split(str(archive_root), "train")
  assert [(c, n.split(":")[-1]) for c, n, _ in items] == [("a", "train/a/x.png"),
                                                          ("b", "train/b/x.png")]
  assert tf.io.decode_png(items[1][2]()).numpy()[0, 0, 0] == 200


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "cifar10_jpeg", "test.tar")),
                    reason="../shared/data/cifar10_jpeg not present")
def test_shared_cifar10_jpeg_archive_lists_all_test_images():
  items = image_folder._list_split(os.path.join(SHARED_DATA, "cifar10_jpeg"), "test")
  assert len(items) == 10_000
  assert sorted({c for c, _, _ in items}) == sorted(
      ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
       "truck"]) or len({c for c, _, _ in items}) == 10


# ------------------------------------------- the corrupt-file policy is part of the copy

def _small_folder(root, corrupt: bool):
  """<root>/train/{a,b}/: three real 16x16 PNGs per class, and with `corrupt` one file
  with a .png name that is not an image. Returns (root, the corrupt file's path)."""
  for cls, value in (("a", 40), ("b", 200)):
    for i in range(3):
      path = root / "train" / cls / f"{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(tf.io.encode_png(np.full((16, 16, 3), value + i, np.uint8)).numpy())
  bad = root / "train" / "b" / "broken.png"
  if corrupt:
    bad.write_bytes(b"this is a text file with a .png name")
  return str(root), str(bad)


def _data_cfg(folder, data_dir, corrupt):
  from resnet_jax.config_schema import base_config
  data = base_config().data
  data.dataset, data.image_folder, data.image_size = "image_folder", folder, 16
  data.data_dir, data.corrupt_images = data_dir, corrupt
  return data


def _prepare(folder, data_dir, corrupt):
  """(builder, whether this call prepared it) through the path training takes."""
  from resnet_jax.data import datasets
  cfg = _data_cfg(folder, data_dir, corrupt)
  before = image_folder.ImageFolder(root_dir=folder, image_size=16, corrupt=corrupt,
                                    data_dir=data_dir).is_prepared()
  return datasets.prepare_builder(cfg), not before


def _files_and_mtimes(directory):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(directory) for f in fs}


def test_corrupt_policy_is_part_of_the_prepared_datasets_identity(tmp_path, capsys):
  folder, bad = _small_folder(tmp_path / "imgs", corrupt=True)
  data_dir = str(tmp_path / "tfds")
  # skip: prepared, the corrupt file left out and listed.
  skip, prepared = _prepare(folder, data_dir, "skip")
  assert prepared and image_folder.skipped_files(skip) == [bad]
  assert skip.info.splits["train"].num_examples == 6
  stored = _files_and_mtimes(skip.data_dir)
  assert any(f.endswith("dataset_info.json") for f in stored)
  # error on the same folder: not satisfied by the skip copy; prepared again, which stops
  # with one line naming the file (through the command line, exit 2).
  code = cli.main(_argv(folder, tmp_path, "--config.data.corrupt_images=error"))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  errors = [line for line in err if line.startswith("resnet_jax: error:")]
  assert len(errors) == 1 and errors == err[-1:], err
  assert f"corrupt image file {bad}:" in errors[0], errors
  error_builder = image_folder.ImageFolder(root_dir=folder, image_size=16, corrupt="error",
                                           data_dir=data_dir)
  assert error_builder.data_dir != skip.data_dir and not error_builder.is_prepared()
  # skip again: the first copy, reused as it was (not prepared again).
  again, prepared = _prepare(folder, data_dir, "skip")
  assert not prepared and again.data_dir == skip.data_dir
  assert _files_and_mtimes(again.data_dir) == stored
  assert image_folder.skipped_files(again) == [bad]


def test_a_copy_prepared_with_error_is_not_reused_for_skip(tmp_path):
  folder, _ = _small_folder(tmp_path / "imgs", corrupt=False)
  data_dir = str(tmp_path / "tfds")
  error, prepared = _prepare(folder, data_dir, "error")
  assert prepared and image_folder.skipped_files(error) == []
  stored = _files_and_mtimes(error.data_dir)
  skip, prepared = _prepare(folder, data_dir, "skip")
  assert prepared and skip.data_dir != error.data_dir
  assert skip.info.splits["train"].num_examples == error.info.splits["train"].num_examples == 6
  again, prepared = _prepare(folder, data_dir, "error")
  assert not prepared and again.data_dir == error.data_dir
  assert _files_and_mtimes(again.data_dir) == stored


def test_unknown_corrupt_policy_is_refused(tmp_path):
  with pytest.raises(ValueError, match="corrupt='ignore'"):
    image_folder.ImageFolder(root_dir=str(tmp_path), image_size=16, corrupt="ignore",
                             data_dir=str(tmp_path / "tfds"))
