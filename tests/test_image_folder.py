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
