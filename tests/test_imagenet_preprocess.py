"""ImageNet-style preprocessing (data/imagenet_preprocess.py) and the pipeline around it: crops
from encoded bytes, seeded like the rest of the train stream; eval equal to torchvision's
Resize + CenterCrop done by hand with PIL; the encoded image folder and TFDS's imagenet2012
builder (on a tiny fake ILSVRC2012 made of real photos) through input_pipeline and training."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax import main as cli
from resnet_jax.config_schema import base_config, check_values
from resnet_jax.errors import ConfigError
from resnet_jax.data import datasets, imagenet_preprocess as ipp, input_pipeline as ip

from conftest import REPO, SHARED_DATA

CIFAR_JPEG = os.path.join(SHARED_DATA, "cifar10_jpeg")


def _photo(name="china.jpg"):
  """A real 427x640 photograph that ships with scikit-learn."""
  from sklearn.datasets import load_sample_image
  return load_sample_image(name)


@pytest.fixture(scope="module")
def photo_jpeg():
  return tf.io.encode_jpeg(_photo(), quality=90).numpy()


def _seed(*values):
  return tf.constant(values, tf.int64)


# --- train crops ------------------------------------------------------------------------------

def test_train_crop_is_deterministic_per_seed_and_differs_across_seeds(photo_jpeg):
  images = [ipp.train_image(photo_jpeg, _seed(5, i), 64).numpy() for i in range(6)]
  again = [ipp.train_image(photo_jpeg, _seed(5, i), 64).numpy() for i in range(6)]
  for a, b in zip(images, again):
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  distinct = {a.tobytes() for a in images}
  assert len(distinct) == len(images)


@pytest.mark.parametrize("height,width", [(427, 640), (640, 427), (300, 300), (150, 1000)])
def test_crop_windows_stay_within_area_and_aspect_bounds(height, width):
  window = tf.function(lambda s: tf.stack(ipp.random_crop_window(height, width, s)))
  rows = np.array([window(_seed(1, i)).numpy() for i in range(300)])
  top, left, h, w = rows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  assert (area >= 0.08).all() and (area <= 1.0).all()
  # TF rounds the width to whole pixels: the ratio may miss the bounds by half a pixel.
  ratio, slack = w / h, 0.5 / h + 1e-9
  assert (ratio >= 3 / 4 - slack).all() and (ratio <= 4 / 3 + slack).all()
  # A real spread of crops, not one fixed window (150x1000 fits at most 20%).
  assert len(set(map(tuple, rows))) > 250
  if height / width > 0.5:
    assert area.min() < 0.15 and area.max() > 0.6


def test_failed_sampling_falls_back_to_the_largest_center_crop_in_the_aspect_range():
  # 37x900: no crop of area >= 8% has an aspect ratio <= 4/3, so every attempt fails.
  top, left, h, w = [int(v) for v in ipp.random_crop_window(37, 900, _seed(0, 0))]
  assert (h, w) == (37, 49) and top == 0 and left == (900 - 49) // 2


def test_jpeg_crop_decodes_only_the_window_a_full_decode_would_crop(photo_jpeg):
  # decode_and_crop_jpeg (JPEG) and decode + slice (any other format) give the same pixels,
  # with the same IDCT (train decodes as eval and PIL do: INTEGER_ACCURATE).
  decoded = tf.io.decode_jpeg(photo_jpeg, channels=3, dct_method="INTEGER_ACCURATE")
  png = tf.io.encode_png(decoded).numpy()
  for i in range(12):
    np.testing.assert_array_equal(ipp.train_image(photo_jpeg, _seed(2, i), 96),
                                  ipp.train_image(png, _seed(2, i), 96))


# --- eval: torchvision's Resize(256) + CenterCrop(224), by hand with PIL ----------------------
# (tests/test_pixel_exact.py covers more sizes, qualities, crop_pct 224/232 and bicubic.)

def _torchvision_reference(image, resize: int, crop: int):
  """Resize(resize) + CenterCrop(crop) as torchvision computes them, on PIL: image is encoded
  bytes (decoded by PIL, as torchvision's ImageFolder loader does) or decoded pixels."""
  from PIL import Image
  if isinstance(image, bytes):
    image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
  h, w = image.shape[:2]
  if h <= w:
    new_h, new_w = resize, int(resize * w / h)
  else:
    new_h, new_w = int(resize * h / w), resize
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
  top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
  return resized, top, left


@pytest.mark.parametrize("name,transpose", [("china.jpg", False), ("flower.jpg", True)])
def test_eval_center_crop_matches_a_pil_reference(name, transpose):
  pytest.importorskip("PIL")
  photo = _photo(name)
  if transpose:  # portrait: the other side is the shorter one
    photo = np.ascontiguousarray(photo.transpose(1, 0, 2))
  encoded = tf.io.encode_jpeg(photo, quality=95).numpy()
  # The reference decodes the JPEG with PIL, as torchvision does: the comparison covers the
  # decoder too (TF's default fast IDCT alone is ~1 level off on average, up to 17).
  resized, top, left = _torchvision_reference(encoded, 256, 224)
  ours = ipp.eval_image(encoded, 224, crop_pct=0.875, antialias=True).numpy().astype(float)
  assert ours.shape == (224, 224, 3)

  def error(dy, dx):
    ref = resized[top + dy:top + dy + 224, left + dx:left + dx + 224]
    return np.abs(ours - ref).mean() if ref.shape == ours.shape else np.inf

  # The same pixels (PIL's IDCT, Pillow's resampling in TF ops); a crop one pixel off
  # differs by levels, so the offsets are torchvision's.
  np.testing.assert_array_equal(ours, resized[top:top + 224, left:left + 224])
  assert min(error(dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))) > 1
  # TF's antialiased resize (resizer="tf") and TF's fast IDCT, the old antialias=True path,
  # stay within a couple of levels on average: what the exact path removed.
  old = ipp.eval_image(encoded, 224, antialias=True, resizer="tf", dct_method="").numpy()
  assert 0.3 < np.abs(old - resized[top:top + 224, left:left + 224].astype(float)).mean() < 3


def test_eval_upscales_small_images_and_follows_torchvision_sizes():
  photo = _photo()[100:130, 200:250]  # 30x50: upscaled, like a CIFAR image
  encoded = tf.io.encode_png(photo).numpy()
  resized, top, left = _torchvision_reference(photo, 256, 224)
  ours = ipp.eval_image(encoded, 224, antialias=True).numpy()
  assert resized.shape[:2] == (256, 426) and (top, left) == (16, 101)
  np.testing.assert_array_equal(ours, resized[top:top + 224, left:left + 224])
  assert ipp.eval_resize_size(224, 0.875) == 256 and ipp.eval_resize_size(240, 0.875) == 274
  assert ipp.eval_resize_size(224, 224 / 232) == 232    # torchvision's V2 weights


def test_bgr_flips_channels(photo_jpeg):
  rgb = ipp.train_image(photo_jpeg, _seed(7, 7), 48).numpy()
  bgr = ipp.train_image(photo_jpeg, _seed(7, 7), 48, channel_order="BGR").numpy()
  np.testing.assert_array_equal(bgr, rgb[..., ::-1])
  rgb = ipp.eval_image(photo_jpeg, 48).numpy()
  np.testing.assert_array_equal(ipp.eval_image(photo_jpeg, 48, channel_order="BGR"),
                                rgb[..., ::-1])
  cfg = base_config().data
  cfg.dataset, cfg.channel_order = "imagenet2012", "BGR"
  mean, std = datasets.normalization(cfg)   # dataset defaults follow the channel order
  assert mean == (103.53, 116.28, 123.675) and std == (57.375, 57.12, 58.395)


# --- the encoded image folder through input_pipeline ------------------------------------------

def _tar_members(split, per_class, classes=3):
  """{class: [(name, bytes)]}: the first `per_class` JPEGs of `classes` classes."""
  out = {}
  with tarfile.open(os.path.join(CIFAR_JPEG, f"{split}.tar")) as tar:
    for m in tar:
      if not m.isfile() or not m.name.lower().endswith(".jpg"):
        continue
      cls = m.name.split("/")[-2]
      if cls in out and len(out[cls]) >= per_class:
        continue
      if cls not in out and len(out) >= classes:
        continue
      out.setdefault(cls, []).append((os.path.basename(m.name), tar.extractfile(m).read()))
      if len(out) == classes and all(len(v) >= per_class for v in out.values()):
        return out
  return out


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  if not os.path.isfile(os.path.join(CIFAR_JPEG, "train.tar")):
    pytest.skip("../shared/data/cifar10_jpeg not present")
  root = tmp_path_factory.mktemp("jpeg_folder")
  for split, per_class in (("train", 12), ("test", 5)):
    for cls, files in _tar_members(split, per_class).items():
      (root / split / cls).mkdir(parents=True)
      for name, data in files:
        (root / split / cls / name).write_bytes(data)
  # One PNG (stored as PNG, cropped by the non-JPEG path) and one corrupt file (skipped).
  cls = sorted(os.listdir(root / "test"))[0]
  first = sorted((root / "test" / cls).iterdir())[0]
  (root / "test" / cls / "as_png.png").write_bytes(
      tf.io.encode_png(tf.io.decode_jpeg(first.read_bytes())).numpy())
  (root / "train" / cls / "broken.jpg").write_bytes(first.read_bytes()[:200])
  return str(root)


def _folder_cfg(folder, data_dir, **kw):
  cfg = base_config().data
  cfg.dataset, cfg.image_folder, cfg.data_dir = "image_folder", folder, str(data_dir)
  cfg.preprocess, cfg.image_size, cfg.random_flip = "imagenet", 24, True
  for key, value in kw.items():
    cfg[key] = value
  return cfg


def test_encoded_folder_keeps_the_original_bytes(jpeg_folder, tmp_path):
  builder = datasets.prepare_builder(_folder_cfg(jpeg_folder, tmp_path))
  assert builder.info.splits["train"].num_examples == 36      # broken.jpg skipped
  assert builder.info.splits["test"].num_examples == 16
  assert [f.split("/")[-1] for f in builder.info.metadata["skipped_files"]] == ["broken.jpg"]
  ds = builder.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()})
  for ex in ds.as_numpy_iterator():
    with open(ex["file"].decode(), "rb") as f:
      assert ex["image"] == f.read()
  decoded = datasets.prepare_builder(_folder_cfg(jpeg_folder, tmp_path, preprocess="cifar",
                                                 image_size=32))
  assert decoded.info.name == builder.info.name and decoded.data_dir != builder.data_dir


def test_encoded_folder_train_and_eval_batches(jpeg_folder, tmp_path):
  cfg = _folder_cfg(jpeg_folder, tmp_path)
  builder = datasets.prepare_builder(cfg)
  assert ip.image_shape(builder, cfg) == (24, 24, 3)
  split = ip.train_split_info(builder, cfg)

  def stream(start_step=0):
    return ip.train_batches(builder, cfg, seed=1, global_batch=8, start_step=start_step,
                            split_info=split)

  first = [next(it) for it in [stream()] for _ in range(6)]   # crosses the epoch (4 steps)
  for b in first:
    assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (8,)
  resumed = stream(start_step=3)
  for k in range(3, 6):
    np.testing.assert_array_equal(next(resumed)["image"], first[k]["image"])

  labels, count = [], 0
  for p in range(2):   # 16 test examples over 2 processes, batches of 3: pad and mask
    shard = ip.process_split(builder, "test", drop_remainder=False, process_index=p,
                             process_count=2)
    n = ip.num_eval_batches(shard.num_examples_total, 2, 3)
    for b in ip.eval_batches(builder, cfg, batch_size=3, split_info=shard, num_batches=n,
                             dataset_cache={}):
      assert b["image"].shape == (3, 24, 24, 3) and b["image"].dtype == np.uint8
      labels.extend(b["label"][b["mask"]])
      count += int(b["mask"].sum())
  full = [ex["label"] for ex in builder.as_dataset(split="test").as_numpy_iterator()]
  assert count == 16 and sorted(labels) == sorted(full)


# --- TFDS's imagenet2012 builder on a fake ILSVRC2012 ------------------------------------------

def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _fake_ilsvrc2012(manual_dir):
  """The official tars' layout: train = one tar per synset, val = flat ILSVRC2012_val_*.JPEG
  (labels come from TFDS's own validation_labels.txt); content: crops of a real photo."""
  photo = _photo()
  def jpeg(i):
    return tf.io.encode_jpeg(photo[7 * i:7 * i + 300, 11 * i:11 * i + 400], quality=90).numpy()
  os.makedirs(manual_dir)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for k, synset in enumerate(["n01440764", "n01443537"]):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for j in range(4):
          _add(inner, f"{synset}_{j}.JPEG", jpeg(4 * k + j))
      _add(outer, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for j in range(1, 6):
      _add(val, f"ILSVRC2012_val_{j:08d}.JPEG", jpeg(10 + j))


def test_imagenet2012_config_trains_and_evaluates_every_example(tmp_path, capsys):
  manual = str(tmp_path / "manual")
  _fake_ilsvrc2012(manual)
  code = cli.main([f"--config={os.path.join(REPO, 'configs', 'imagenet_resnet50.py')}",
                   f"--config.data.manual_dir={manual}", f"--config.data.data_dir={tmp_path}/tfds",
                   "--config.model.name=resnet8", "--config.model.dtype=float32",
                   "--config.data.image_size=32", "--config.data.batch_size=4",
                   "--config.data.eval_batch_size=2", "--config.num_train_steps=2",
                   "--config.schedule.warmup_epochs=0", f"--workdir={tmp_path}/work"])
  assert code == 0, capsys.readouterr().err[-2000:]
  results = json.load(open(tmp_path / "work" / "results.json"))
  assert results["examples"] == 5 and results["step"] == 2   # 5 val images, 3 batches of 2
  cfg = base_config().data
  cfg.dataset, cfg.data_dir = "imagenet2012", str(tmp_path / "tfds")
  builder = datasets.prepare_builder(cfg)
  labels = builder.info.features["label"]
  val = sorted((ex["file_name"].decode(), labels.int2str(ex["label"]))
               for ex in builder.as_dataset(split="validation").as_numpy_iterator())
  # TFDS's validation_labels.txt starts n01751748, n09193705, n02105855, n04263257, n03125729.
  assert [v[1] for v in val] == ["n01751748", "n09193705", "n02105855", "n04263257",
                                 "n03125729"]


def test_imagenet2012_manual_dir_without_the_tars_names_the_key(tmp_path):
  cfg = base_config().data
  cfg.dataset, cfg.preprocess, cfg.image_size = "imagenet2012", "imagenet", 224
  cfg.data_dir, cfg.manual_dir = str(tmp_path / "tfds"), str(tmp_path)
  with pytest.raises(ConfigError, match=r"'data\.manual_dir'.*ILSVRC2012_img_train\.tar"):
    datasets.prepare_builder(cfg)


# --- config errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("changes,culprit", [
    ({"preprocess": "inception"}, "'data.preprocess'='inception'"),
    ({"channel_order": "GBR"}, "'data.channel_order'='GBR'"),
    ({"preprocess": "imagenet", "image_size": 224, "crop_pct": 0.0}, "'data.crop_pct'=0.0"),
    ({"preprocess": "imagenet", "image_size": 224, "crop_pct": 1.2}, "'data.crop_pct'=1.2"),
    ({"preprocess": "imagenet"}, "'data.image_size'=0"),
    ({"preprocess": "imagenet", "image_size": 224, "crop_padding": 4}, "'data.crop_padding'=4"),
    ({"dataset": "imagenet2012", "image_size": 224}, "'data.preprocess'='cifar'"),
    ({"dataset": "imagenet2012", "preprocess": "imagenet", "image_size": 224},
     "'data.eval_split'='test'"),
])
def test_bad_preprocess_values_name_the_key(changes, culprit):
  cfg = base_config()
  for key, value in changes.items():
    cfg.data[key] = value
  with pytest.raises(ConfigError) as e:
    check_values(cfg, num_devices=1, num_processes=1)
  assert culprit in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_preprocess_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
  code = cli.main([f"--config={os.path.join(REPO, 'configs', 'imagenet_resnet50.py')}",
                   "--config.data.crop_pct=1.5", f"--workdir={tmp_path}/w"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err[-1].startswith("resnet_jax: error: config key 'data.crop_pct'=1.5")
  assert not (tmp_path / "w").exists()
