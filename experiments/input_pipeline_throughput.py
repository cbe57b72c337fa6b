"""How many CPU cores ImageNet-style training preprocessing needs per accelerator.

Measures resnet_jax.data.imagenet_preprocess.train_image -- JPEG decode of a random-resized
crop, bilinear resize to 224, random flip, uint8 batch -- in images/s per CPU core, with the
tf.data private threadpool at 1 and 2 threads (intra-op parallelism 1), and prints the cores
one accelerator needs at a given training rate (--step-images-per-sec).

ImageNet itself is not available here, so the images are a proxy at ImageNet-like size
(JPEG decode cost scales with the pixel count and the compressed bits per pixel):
  --source cifar:  CIFAR-10 JPEGs from ../shared/data/cifar10_jpeg upscaled to 500x375 and
                   re-encoded at quality 90. Real images, but upscaled ones are smooth, so
                   they compress to far fewer bytes than photos: entropy decoding is cheaper
                   than on ImageNet (an optimistic bound).
  --source photos: 375x500 crops (random offsets, flips) of the two real 427x640 photographs
                   that ship with scikit-learn, re-encoded at quality 90: photo-like
                   bits/pixel, close to ImageNet's (~110 KB per ~400x350 image).
The set is written as files into a temp dir and read into memory, then repeated: file reading
is not measured (sequential TFRecord reads are cheap next to decoding).

  python experiments/input_pipeline_throughput.py --source photos --step-images-per-sec 5000

Augmentation (--augment, a comma list of recipes, each measured as its own rows): "none", or
"+"-joined parts: raNmM (RandAugment, N ops at magnitude M), ta (TrivialAugment), reP
(random erasing with probability P), e.g. --augment none,ra2m9,ta,re0.25,ra2m9+re0.25. They
run after the crop as input_pipeline.py runs them (policy on RGB, erasing last). Mixup and
cutmix run on the accelerator inside the train step, not on the host; --mix also times
training/steps.mix_batch on this CPU (jax) per batch, as the worst case of doing it on a
host.
"""

import argparse
import contextlib
import io
import os
import sys
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from resnet_jax.data import augment, imagenet_preprocess as ipp  # noqa: E402
from resnet_jax.data.catalog import DATASETS  # noqa: E402

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                       "shared", "data"))


def _cifar_images(n):
  path = os.path.join(SHARED, "cifar10_jpeg", "train.tar")
  if not os.path.isfile(path):
    sys.exit(f"{path} not found: use --source photos")
  out = []
  with tarfile.open(path) as tar:
    for m in tar:
      if m.isfile() and m.name.endswith(".jpg"):
        out.append(tf.io.decode_jpeg(tar.extractfile(m).read(), channels=3))
        if len(out) == n:
          return out
  return out


def _photo_crops(n, height, width):
  from sklearn.datasets import load_sample_image
  photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
  rng = np.random.RandomState(0)
  out = []
  for i in range(n):
    photo = photos[i % 2]
    top = rng.randint(0, photo.shape[0] - height + 1)
    left = rng.randint(0, photo.shape[1] - width + 1)
    crop = photo[top:top + height, left:left + width]
    out.append(crop[:, ::-1] if rng.rand() < 0.5 else crop)
  return out


def build_proxy_set(source, n, height, width, quality, folder):
  """Write n JPEGs of height x width into folder/train/proxy/ (an image folder with one
  class); return their paths."""
  os.makedirs(os.path.join(folder, "train", "proxy"))
  if source == "cifar":
    images = [tf.image.resize(im, (height, width), method="bilinear") for im in _cifar_images(n)]
    images = [tf.cast(tf.clip_by_value(tf.round(im), 0, 255), tf.uint8) for im in images]
  else:
    images = _photo_crops(n, height, width)
  paths = []
  for i, image in enumerate(images):
    path = os.path.join(folder, "train", "proxy", f"{i:05d}.jpg")
    with open(path, "wb") as f:
      f.write(tf.io.encode_jpeg(image, quality=quality).numpy())
    paths.append(path)
  return paths


def _train_full_decode(encoded, seed, image_size):
  """The same crop without decode_and_crop_jpeg: decode everything, then slice (comparison)."""
  image = tf.io.decode_jpeg(encoded, channels=3)
  shape = tf.shape(image)
  top, left, h, w = ipp.random_crop_window(
      shape[0], shape[1], tf.random.experimental.stateless_fold_in(seed, 0))
  image = tf.image.resize(image[top:top + h, left:left + w], (image_size, image_size))
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return tf.image.stateless_random_flip_left_right(
      image, seed=tf.random.experimental.stateless_fold_in(seed, 1))


def parse_augment(spec: str) -> dict:
  """'none' or e.g. 'ra2m9+re0.25' -> the data config keys it sets."""
  keys = {}
  for part in spec.split("+"):
    if part == "none":
      continue
    if m := re.fullmatch(r"ra(\d+)m([\d.]+)", part):
      keys.update(randaugment_ops=int(m[1]), randaugment_magnitude=float(m[2]))
    elif part == "ta":
      keys.update(trivial_augment=True)
    elif m := re.fullmatch(r"re([\d.]+)", part):
      keys.update(random_erasing=float(m[1]))
    else:
      raise SystemExit(f"--augment: unknown part {part!r} (none, raNmM, ta, reP)")
  return keys


def augment_train(image, seed, keys: dict):
  """What input_pipeline._augment adds after the crop and flip (RGB, ImageNet statistics)."""
  image = augment.augment_policy(
      image, tf.random.experimental.stateless_fold_in(seed, 2),
      randaugment_ops=keys.get("randaugment_ops", 0),
      randaugment_magnitude=keys.get("randaugment_magnitude", 9.0),
      trivial_augment_on=keys.get("trivial_augment", False))
  if keys.get("random_erasing", 0) > 0:
    spec = DATASETS["imagenet2012"]
    image = augment.random_erasing(image, tf.random.experimental.stateless_fold_in(seed, 3),
                                   keys["random_erasing"], spec.mean, spec.std)
  return image


def make_dataset(encoded, mode, threads, image_size, batch, antialias, augment_keys=None):
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded)).repeat().enumerate()

  def preprocess(index, encoded):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    if mode == "train":
      image = ipp.train_image(encoded, seed, image_size, antialias=antialias)
      return augment_train(image, seed, augment_keys or {})
    if mode == "train_full_decode":
      return _train_full_decode(encoded, seed, image_size)
    return ipp.eval_image(encoded, image_size, antialias=antialias)

  ds = ds.map(preprocess, num_parallel_calls=threads).batch(batch, drop_remainder=True)
  ds = ds.prefetch(2)
  options = tf.data.Options()
  options.deterministic = True                        # as in training
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def pipeline_batches(folder, image_size, batch, antialias, augment_keys=None):
  """The real thing: the proxy set as an encoded image_folder dataset (TFDS), read by
  input_pipeline.train_batches (shuffle, per-example seeds, AUTOTUNE map, batch, prefetch)."""
  import tensorflow_datasets as tfds
  from absl import logging
  from resnet_jax.config_schema import base_config
  from resnet_jax.data import datasets, input_pipeline
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.ERROR)
  cfg = base_config().data
  cfg.dataset, cfg.image_folder = "image_folder", folder
  cfg.data_dir = os.path.join(os.path.dirname(folder), "tfds")
  cfg.preprocess, cfg.image_size = "imagenet", image_size
  cfg.random_flip, cfg.antialias = True, antialias
  for key, value in (augment_keys or {}).items():
    cfg[key] = value
  with contextlib.redirect_stdout(io.StringIO()):   # TFDS's "Downloading and preparing..."
    builder = datasets.prepare_builder(cfg)
  split = input_pipeline.train_split_info(builder, cfg)
  return input_pipeline.train_batches(builder, cfg, seed=0, global_batch=batch, start_step=0,
                                      split_info=split)


def mix_batches(batch, image_size):
  """An endless iterator timing steps.mix_batch (mixup or cutmix, alphas 0.8 / 1.0) on this
  CPU, on normalised float32 batches as the train step mixes them."""
  import jax
  import jax.numpy as jnp
  from resnet_jax.training import steps
  images = jnp.asarray(np.random.RandomState(0).randn(batch, image_size, image_size, 3),
                       jnp.float32)
  targets = steps.soft_targets(jnp.arange(batch) % 1000, 1000, 0.1)
  mix = jax.jit(lambda k, x, y: steps.mix_batch(k, x, y, mixup_alpha=0.8, cutmix_alpha=1.0))
  key = jax.random.PRNGKey(0)
  step = 0
  while True:
    out = mix(jax.random.fold_in(key, step), images, targets)
    jax.block_until_ready(out)
    step += 1
    yield out


def measure(it, batch, seconds, warmup_batches=3):
  """(images/s of wall time, images per CPU-second of this process) for numpy batches
  delivered to Python (what the trainer consumes). The CPU-time rate is the per-core cost,
  and stays meaningful when other jobs share the cores (wall time does not)."""
  for _ in range(warmup_batches):
    next(it)
  n, wall, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    next(it)
    n += batch
  return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--source", choices=("cifar", "photos"), default="cifar")
  p.add_argument("--num-images", type=int, default=512)
  p.add_argument("--height", type=int, default=375)
  p.add_argument("--width", type=int, default=500)
  p.add_argument("--quality", type=int, default=90)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--threads", default="1,2")
  p.add_argument("--modes", default="train",
                 help="comma list of train, train_full_decode, eval, pipeline (train through "
                 "TFDS + input_pipeline.train_batches, AUTOTUNE threads)")
  p.add_argument("--antialias", action="store_true")
  p.add_argument("--augment", default="none",
                 help="comma list of train augmentation recipes: none, or '+'-joined raNmM "
                 "(RandAugment), ta (TrivialAugment), reP (random erasing), e.g. "
                 "none,ra2m9,ra2m9+re0.25 (modes train and pipeline)")
  p.add_argument("--mix", action="store_true",
                 help="also time steps.mix_batch (mixup/cutmix) on this CPU")
  p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
  p.add_argument("--repeats", type=int, default=3, help="best of (the machine may be shared)")
  p.add_argument("--step-images-per-sec", type=float, default=5000.0,
                 help="images/s one accelerator trains on (e.g. ~5000: H100, ResNet-50 bf16)")
  args = p.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "images")
    paths = build_proxy_set(args.source, args.num_images, args.height, args.width,
                            args.quality, folder)
    encoded = [open(q, "rb").read() for q in paths]   # in memory: reads are not measured
    kb = np.mean([len(e) for e in encoded]) / 1024
    print(f"proxy set: {len(paths)} {args.source} JPEGs {args.width}x{args.height} q"
          f"{args.quality}, mean {kb:.1f} KB; crop {args.image_size}, antialias "
          f"{args.antialias}; {os.cpu_count()} CPUs visible; best of {args.repeats} x "
          f"{args.seconds:.0f} s")
    print("img/s/core = images per CPU-second used by the whole process (tf.data threads and "
          "the Python consumer);\nwall img/s = delivered rate, lower when the cores are shared")
    print(f"{'mode':<18} {'augment':<14} {'threads':>7} {'wall img/s':>10} "
          f"{'img/s/core':>10} "
          f"{'cores per accelerator at ' + format(args.step_images_per_sec, '.0f') + ' img/s':>36}")
    rows = []
    for mode in args.modes.split(","):
      for recipe in (args.augment.split(",") if mode in ("train", "pipeline") else ["-"]):
        keys = parse_augment(recipe) if recipe != "-" else {}
        for threads in (["auto"] if mode == "pipeline" else map(int, args.threads.split(","))):
          if mode == "pipeline":   # keys bound now: the rows run after this loop
            make = lambda keys=keys: pipeline_batches(  # noqa: E731
                folder, args.image_size, args.batch, args.antialias, keys)
          else:
            ds = make_dataset(encoded, mode, threads, args.image_size, args.batch,
                              args.antialias, keys)
            make = ds.as_numpy_iterator
          rows.append((mode, recipe, threads, make))
    if args.mix:
      rows.append(("mix_batch (jax)", "mixup|cutmix", "jax",
                   lambda: mix_batches(args.batch, args.image_size)))
    for mode, recipe, threads, make in rows:
      runs = [measure(make(), args.batch, args.seconds) for _ in range(args.repeats)]
      wall = max(r[0] for r in runs)
      per_core = max(r[1] for r in runs)
      print(f"{mode:<18} {recipe:<14} {threads:>7} {wall:>10.0f} {per_core:>10.0f} "
            f"{args.step_images_per_sec / per_core:>36.1f}", flush=True)


if __name__ == "__main__":
  main()
