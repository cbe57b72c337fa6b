"""TFDS -> tf.data -> per-process numpy batches.

Train: the stream is a pure function of (seed, step). Epoch e is the process's shard,
shuffled with seed (seed, e); example i of epoch e is augmented with the stateless seed
(seed, e, i). So resuming at step k rebuilds exactly the batches an uninterrupted run
would have seen from step k on: no iterator state needs saving.

Eval: every example of the process's shard exactly once, the last batch padded with
masked-out examples; all processes yield the same number of batches.

data.preprocess picks what happens to an image: "cifar" reads fixed-size decoded images and
optionally pad-crops and flips them; "imagenet" reads the encoded bytes (TFDS SkipDecoding)
and crops, decodes and resizes them with imagenet_preprocess.py. Either way batches hold
uint8 images; mean/std normalisation happens on device.

Train images then get the configured augmentation (augment.py), all from the same
per-example seed: RandAugment (data.randaugment_ops / randaugment_magnitude) or TrivialAugment
(data.trivial_augment) on the RGB crop, the channel reorder, then random erasing
(data.random_erasing, noise in the dataset's mean/std). Mixup and cutmix mix whole global
batches on device, in the train step (steps.py). Eval images are never augmented; for
"imagenet" they are cropped at data.eval_image_size (0 = image_size) with
data.interpolation.
"""

import dataclasses
import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax.data import augment, imagenet_preprocess
from resnet_jax.data.catalog import normalization

# tf.data only runs on the host; keep TensorFlow off any accelerator jax owns.
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  read_split: object           # what to pass to builder.as_dataset for this process
  num_examples: int            # in this process's shard
  num_examples_total: int      # in the whole split, over all processes


def process_split(builder, split: str, *, drop_remainder: bool,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> SplitInfo:
  """This process's even share of `split` (equal sizes when drop_remainder)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if split not in builder.info.splits:
    raise KeyError(f"split {split!r} not in dataset {builder.info.name} "
                   f"(has: {', '.join(builder.info.splits)})")
  total = builder.info.splits[split].num_examples
  shard = tfds.even_splits(split, n=process_count,
                           drop_remainder=drop_remainder)[process_index]
  return SplitInfo(shard, builder.info.splits[shard].num_examples, total)


def _examples(builder, split_info: SplitInfo, data_cfg) -> tf.data.Dataset:
  """{"image", "label"} of the split: decoded images, or encoded bytes (a scalar string) for
  data.preprocess="imagenet", which decodes only the crop it needs."""
  encoded = data_cfg.preprocess == "imagenet"
  ds = builder.as_dataset(split=split_info.read_split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()} if encoded else None,
                          read_config=tfds.ReadConfig(add_tfds_id=False))
  ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.cache() if data_cfg.cache else ds


# Constants folded into an example's seed for the draws after the crop and flip (which use
# the seed itself, or fold in 0 and 1).
_POLICY_SEED, _ERASING_SEED = 2, 3


def _augment(example, seed, data_cfg):
  """Train-time transform of one example, from its stateless seed."""
  if data_cfg.preprocess == "imagenet":
    image = imagenet_preprocess.train_image(
        example["image"], seed, data_cfg.image_size, random_flip=data_cfg.random_flip,
        antialias=data_cfg.antialias, channel_order="RGB")
  else:
    image = example["image"]
    crop_padding = data_cfg.crop_padding
    if crop_padding:
      h, w, c = image.shape
      image = tf.pad(image, [[crop_padding, crop_padding], [crop_padding, crop_padding],
                             [0, 0]])
      image = tf.image.stateless_random_crop(image, (h, w, c), seed=seed)
    if data_cfg.random_flip:
      flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  # The policies' colour ops weigh RGB channels: before the reorder.
  image = augment.augment_policy(
      image, tf.random.experimental.stateless_fold_in(seed, _POLICY_SEED),
      randaugment_ops=data_cfg.randaugment_ops,
      randaugment_magnitude=data_cfg.randaugment_magnitude,
      trivial_augment_on=data_cfg.trivial_augment)
  image = imagenet_preprocess.to_channel_order(image, data_cfg.channel_order)
  if data_cfg.random_erasing > 0:
    mean, std = normalization(data_cfg)     # in the batches' channel order
    image = augment.random_erasing(
        image, tf.random.experimental.stateless_fold_in(seed, _ERASING_SEED),
        data_cfg.random_erasing, mean, std)
  return {"image": image, "label": example["label"]}


def eval_image_size(data_cfg) -> int:
  """The eval crop of data.preprocess="imagenet": data.eval_image_size, 0 = image_size."""
  return data_cfg.eval_image_size or data_cfg.image_size


def _eval_transform(example, data_cfg):
  image = example["image"]
  if data_cfg.preprocess == "imagenet":
    image = imagenet_preprocess.eval_image(
        image, eval_image_size(data_cfg), crop_pct=data_cfg.crop_pct,
        antialias=data_cfg.antialias, channel_order=data_cfg.channel_order,
        interpolation=data_cfg.interpolation)
  else:
    image = imagenet_preprocess.to_channel_order(image, data_cfg.channel_order)
  return {"image": image, "label": example["label"]}


def image_shape(builder, data_cfg) -> tuple[int, ...]:
  """The shape of one image in the train batches: the crop for data.preprocess="imagenet"
  (the stored images vary in size), else the dataset's fixed image shape. Eval batches of
  "imagenet" are eval_image_size square (the model pools globally; the eval step traces
  for their shape)."""
  if data_cfg.preprocess == "imagenet":
    return (data_cfg.image_size, data_cfg.image_size, 3)
  return tuple(builder.info.features["image"].shape)


def train_batches(builder, data_cfg, *, seed: int, global_batch: int, start_step: int,
                  split_info: SplitInfo, process_index: int = 0, process_count: int = 1,
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process train batches, starting with the batch of global step start_step.

  split_info is what this process reads: the whole split (process_sharding="batch": every
  process walks the same global order and keeps its slice of each global batch, so global
  batches do not depend on the process count) or its own shard ("split": 1/n of the reads,
  for datasets too large to read n times; batches then depend on the process count).
  """
  whole_split = data_cfg.process_sharding == "batch"
  local_batch = global_batch // process_count
  read_batch = global_batch if whole_split else local_batch
  steps_per_epoch = train_steps_per_epoch(split_info, data_cfg, global_batch, process_count)
  if steps_per_epoch == 0:
    raise ValueError(f"batch {read_batch} is larger than the {split_info.num_examples} "
                     "train examples read by this process")
  base = _examples(builder, split_info, data_cfg)
  buffer = data_cfg.shuffle_buffer or split_info.num_examples
  examples_per_epoch = steps_per_epoch * read_batch

  def epoch_dataset(epoch, skip_examples=0):
    epoch = tf.cast(epoch, tf.int64)
    ds = base.shuffle(buffer, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
    ds = ds.take(examples_per_epoch).enumerate().skip(skip_examples)
    if whole_split and process_count > 1:
      # Keep this process's contiguous slice of every global batch, before augmenting.
      ds = ds.filter(lambda i, _: (i % global_batch) // local_batch == process_index)
    def augment(index, example):
      example_seed = tf.stack([tf.cast(seed, tf.int64) * 65_537 + epoch, index])
      return _augment(example, example_seed, data_cfg)
    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)

  start_epoch, offset = divmod(start_step, steps_per_epoch)
  first = epoch_dataset(start_epoch, offset * read_batch)
  rest = tf.data.Dataset.range(start_epoch + 1, 2**62).flat_map(epoch_dataset)
  ds = first.concatenate(rest).batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(data_cfg.prefetch or tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.as_numpy_iterator()


def train_split_info(builder, data_cfg, *, process_index: int | None = None,
                     process_count: int | None = None) -> SplitInfo:
  """What this process reads of the train split: all of it with process_sharding="batch"
  (it keeps its slice of each global batch), its even shard with "split"."""
  if data_cfg.process_sharding == "batch":
    process_index, process_count = 0, 1
  return process_split(builder, data_cfg.train_split, drop_remainder=True,
                       process_index=process_index, process_count=process_count)


def train_steps_per_epoch(split_info: SplitInfo, data_cfg, global_batch: int,
                          process_count: int) -> int:
  if data_cfg.process_sharding == "batch":
    return split_info.num_examples // global_batch
  return split_info.num_examples // (global_batch // process_count)


def eval_batches(builder, data_cfg, *, batch_size: int, split_info: SplitInfo,
                 num_batches: int, dataset_cache: dict) -> Iterator[dict[str, np.ndarray]]:
  """`num_batches` per-process batches with a `mask`; padding examples have mask 0."""
  key = (split_info.read_split, batch_size)
  if key not in dataset_cache:  # build (and cache in memory) once per run
    ds = _examples(builder, split_info, data_cfg)
    ds = ds.map(lambda ex: dict(_eval_transform(ex, data_cfg), mask=tf.constant(True)),
                num_parallel_calls=tf.data.AUTOTUNE)
    pad = num_batches * batch_size - split_info.num_examples
    element = ds.element_spec
    padding = tf.data.Dataset.from_tensors(
        {k: tf.zeros(v.shape, v.dtype) for k, v in element.items()}).repeat(pad)
    ds = ds.concatenate(padding).batch(batch_size, drop_remainder=True)
    dataset_cache[key] = ds.prefetch(data_cfg.prefetch or tf.data.AUTOTUNE)
  return dataset_cache[key].as_numpy_iterator()


def num_eval_batches(split_total: int, process_count: int, batch_size: int) -> int:
  """Batches every process runs so the largest shard fits (shards differ by at most 1)."""
  largest_shard = math.ceil(split_total / process_count)
  return math.ceil(largest_shard / batch_size)
