"""ImageNet-style preprocessing in TF ops, on encoded JPEG/PNG bytes, for tf.data.

Train: random-resized crop ("Inception crop") sampled by `stateless_sample_distorted_bounding_box`
(area 8%..100% of the image, aspect ratio 3/4..4/3, 10 attempts, then a center crop), decoded
straight from the JPEG data so only the crop's pixels are decoded, resized to image_size and
randomly flipped. All randomness comes from the per-example seed, so the train stream stays a
pure function of (seed, step) like the rest of input_pipeline.py.

Eval: torchvision's `Resize(floor(image_size / crop_pct)) + CenterCrop(image_size)`: the whole
image is decoded, its shorter side resized (longer side truncated to int, as torchvision does),
and the center taken with torchvision's offsets (round half to even). With antialias=True the
resize is the same triangle filter PIL uses, so results follow torchvision+PIL to about one
grey level (measured on real photos: mean 0.14, max 1; without antialiasing, downscaled
images differ by 1-4 levels on average, in exchange for 2x cheaper resizes). (Decoding only the center region first would be cheaper, but the resize then sees
other pixel borders and drifts from torchvision's numbers; eval is 4% of the images a run
touches, so exactness wins.)

Output: uint8 HxWx3, RGB or (channel_order="BGR", Caffe-style weights) BGR. Normalisation with
mean/std happens on device, in the output channel order.

Note the crop sampler is TF's, not torchvision's: TF draws the aspect ratio uniformly and then
the height uniformly between the heights giving the min and max area; torchvision draws area
and log-aspect uniformly. Both give the same ranges; the distributions within them differ.
"""

import math

import tensorflow as tf

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 10
CHANNEL_ORDERS = ("RGB", "BGR")


def eval_resize_size(image_size: int, crop_pct: float) -> int:
  """The shorter side before the center crop: 256 for 224 at 0.875 (timm's floor rule)."""
  return int(math.floor(image_size / crop_pct + 1e-6))


def _decode_window(encoded, window_fn):
  """The pixels of window_fn(height, width) -> (top, left, h, w) of an encoded image.

  JPEG: decode_and_crop_jpeg runs IDCT, upsampling and colour conversion for the window's
  blocks only and stops reading after its last row, which is most of the train-time saving
  for small crops. Anything else tf.io.decode_image reads (PNG, BMP, GIF): full decode, then
  slice.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = tf.stack(window_fn(shape[0], shape[1]))
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, h, w = window_fn(shape[0], shape[1])
    return image[top:top + h, left:left + w]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _center_window(height, width, ratio_range):
  """torchvision's RandomResizedCrop fallback: the largest center crop whose aspect ratio
  (w/h) is within ratio_range, i.e. the whole image when its own ratio is."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  lo, hi = ratio_range
  ratio = w / h
  crop_w = tf.where(ratio > hi, tf.round(h * hi), w)
  crop_h = tf.where(ratio < lo, tf.round(w / lo), h)
  crop_h, crop_w = tf.cast(crop_h, tf.int32), tf.cast(crop_w, tf.int32)
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def random_crop_window(height, width, seed, *, area_range=AREA_RANGE,
                       aspect_ratio_range=ASPECT_RATIO_RANGE, max_attempts=MAX_ATTEMPTS):
  """(top, left, h, w) of a random-resized crop of a height x width image, from `seed`."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]),
      # No boxes + use_image_if_no_bounding_boxes: the "object" is the whole image, and with
      # min_object_covered=0 only area_range bounds the crop (big_vision's inception_crop;
      # TF's ResNet reference uses 0.1, which silently raises the minimum area to 10%).
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  # After max_attempts failures the sampler returns the whole image: use torchvision's
  # fallback instead, which also keeps the aspect ratio in range.
  failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  center = _center_window(height, width, aspect_ratio_range)
  sampled = (begin[0], begin[1], size[0], size[1])
  return tuple(tf.where(failed, c, s) for c, s in zip(center, sampled))


INTERPOLATIONS = ("bilinear", "bicubic")


def _resize_uint8(image, size, antialias: bool, interpolation: str = "bilinear"):
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
  image = tf.image.resize(image, size, method=interpolation, antialias=antialias)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def to_channel_order(image, channel_order: str):
  """An RGB image (..., 3) in channel_order: BGR for Caffe-style weights."""
  if channel_order not in CHANNEL_ORDERS:
    raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
  return image[..., ::-1] if channel_order == "BGR" else image


def train_image(encoded, seed, image_size: int, *, random_flip: bool = True,
                antialias: bool = False, channel_order: str = "RGB",
                area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RATIO_RANGE,
                max_attempts: int = MAX_ATTEMPTS):
  """Encoded image bytes -> uint8 [image_size, image_size, 3] random-resized crop.

  seed: int32/int64 [2], the example's stateless seed; the same seed gives the same crop and
  flip, whatever thread or process runs it.
  """
  seed = tf.convert_to_tensor(seed)
  crop_seed = tf.random.experimental.stateless_fold_in(seed, 0)
  flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
  image = _decode_window(encoded, lambda h, w: random_crop_window(
      h, w, crop_seed, area_range=area_range, aspect_ratio_range=aspect_ratio_range,
      max_attempts=max_attempts))
  image = _resize_uint8(image, (image_size, image_size), antialias)
  if random_flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  image = to_channel_order(image, channel_order)
  image.set_shape((image_size, image_size, 3))
  return image


def eval_resize_shape(height, width, resize_size: int):
  """torchvision's Resize(resize_size) output size: shorter side resize_size, longer side
  int(resize_size * long / short) (truncated, computed in float64 as Python does)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  size = tf.constant(resize_size, tf.float64)
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, size, tf.floor(size * h / short))
  new_w = tf.where(w < h, size, tf.floor(size * w / short))
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def eval_image(encoded, image_size: int, *, crop_pct: float = 0.875, antialias: bool = False,
               channel_order: str = "RGB", interpolation: str = "bilinear"):
  """Encoded image bytes -> uint8 [image_size, image_size, 3]: shorter side resized to
  image_size / crop_pct, then the center image_size square (torchvision's offsets).
  interpolation: "bilinear" (torchvision's weights) or "bicubic" (most timm weights)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  shape = tf.shape(image)
  new_h, new_w = eval_resize_shape(shape[0], shape[1], eval_resize_size(image_size, crop_pct))
  image = _resize_uint8(image, tf.stack([new_h, new_w]), antialias, interpolation)
  # torchvision: int(round((new - size) / 2.0)); tf.round also rounds half to even.
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2), tf.int32)
  image = image[top:top + image_size, left:left + image_size]
  image = to_channel_order(image, channel_order)
  image.set_shape((image_size, image_size, 3))
  return image
