"""Train-time image augmentation in TF ops on uint8 HWC images: RandAugment, TrivialAugment
and random erasing, for tf.data.

Every random choice is a stateless draw from the example's seed (input_pipeline.py gives each
example the seed (seed, epoch, index)), with a distinct constant folded in per decision, so
the augmented stream stays a pure function of (seed, step) and a resumed run sees the same
pixels bit for bit.

The ops are torchvision's (transforms/autoaugment.py, `_apply_op` on uint8 tensors): identity,
shear_x/y (about the top-left corner), translate_x/y, rotate (about the centre), brightness,
color (saturation), contrast, sharpness, posterize, solarize, autocontrast, equalize; nearest
interpolation, fill 0, float32 arithmetic truncated back to uint8 as torchvision's tensor path
does. A signed op's magnitude gets a random sign (probability 1/2 each).

- RandAugment(num_ops=N, magnitude=M): N ops drawn uniformly (with replacement); the
  magnitude is the fraction M/10 of torchvision's RandAugment ranges (shear 0.3, translate
  150/331 of the image side, rotate 30 degrees, enhance factors 1 +- 0.9, posterize 8..4
  bits, solarize threshold 255..0). For an integer M that is exactly torchvision's
  `RandAugment(num_ops=N, magnitude=M, num_magnitude_bins=11)` (the paper's 0..10 scale;
  torchvision's default 31 bins would read M as an index of 0..30); a fractional M
  interpolates. timm's `rand-mN` uses the same M/10 fraction with its own ranges.
- TrivialAugment: torchvision's TrivialAugmentWide: one op, a magnitude bin drawn uniformly
  from 31 (fraction bin/30) of the wide ranges (shear 0.99, translate 32 px, rotate 135
  degrees, enhance 1 +- 0.99, posterize 8..2 bits, solarize 255..0).
- Random erasing: torchvision's RandomErasing parameters (area 2%..33% of the image, aspect
  ratio 0.3..3.3 log-uniform, 10 attempts, else no erasing), filled with per-pixel normal
  noise in normalised units, i.e. round(mean + std * N(0, 1)) clipped to 0..255 in pixel
  units (timm's RandomErasing mode="pixel", its train.py default; torchvision's default
  value=0 would be the mean colour after normalisation). Applied to uint8 before the
  on-device normalisation, so mean/std are the dataset's, in the image's channel order.

Checked against torchvision 0.29's `_apply_op` on uint8 tensors (RGB photo crops and 8x8 grey
images, every op at levels 0, 0.3, 0.9, 1 of both spaces, both signs): the same pixels, and
the same magnitudes as its tables, for every op but rotate, which differs only where a source
coordinate falls on a rounding tie (TF's nearest rounds halves away from zero, grid_sample to
even): none at 9 or 30 degrees, one diagonal line at 135.

Magnitude 0 is the identity for every op but autocontrast and equalize (no magnitude) and
solarize, whose threshold 255 still inverts pure-white pixels (as torchvision's does).
Colour ops need RGB (apply them before a BGR reorder); a 1-channel image is its own
grayscale (color is then the identity).
"""

import dataclasses
import math

import tensorflow as tf

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
       "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
TRIVIAL_AUGMENT_BINS = 31

# Constants folded into a seed, one per decision.
_OP, _SIGN, _LEVEL = 0, 1, 2
_ERASE_APPLY, _ERASE_AREA, _ERASE_RATIO, _ERASE_TOP, _ERASE_LEFT, _ERASE_NOISE = range(6)


@dataclasses.dataclass(frozen=True)
class Space:
  """The magnitude of every op at level 1 (level 0 is the identity)."""
  shear: float                 # tan of the shear angle
  translate: float             # pixels, or a fraction of the side when relative
  translate_relative: bool
  rotate: float                # degrees
  enhance: float               # brightness/color/contrast/sharpness factor 1 +- this
  posterize_bits: int          # bits removed at level 1 (8 - this kept)


RANDAUGMENT = Space(shear=0.3, translate=150.0 / 331.0, translate_relative=True, rotate=30.0,
                    enhance=0.9, posterize_bits=4)
TRIVIAL_AUGMENT_WIDE = Space(shear=0.99, translate=32.0, translate_relative=False,
                             rotate=135.0, enhance=0.99, posterize_bits=6)


def _fold(seed, value: int):
  return tf.random.experimental.stateless_fold_in(seed, value)


def _static_hwc(image):
  h, w, c = image.shape
  if h is None or w is None or c is None:
    raise ValueError(f"augment needs a static image shape (H, W, C), got {image.shape}")
  return h, w, c


def _to_uint8(x):
  """float32 -> uint8 as torchvision's tensor ops: clamp to 0..255, truncate."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def _blend(image, degenerate, magnitude):
  """torchvision's _blend with ratio 1 + magnitude: ratio * image + (1 - ratio) * degenerate,
  the ratio and 1 - ratio computed in float64 (Python floats there) and applied in float32,
  so the truncation to uint8 lands as torchvision's does."""
  ratio = 1.0 + tf.cast(magnitude, tf.float64)
  a, b = tf.cast(ratio, tf.float32), tf.cast(1.0 - ratio, tf.float32)
  return _to_uint8(a * tf.cast(image, tf.float32) + b * degenerate)


def _grayscale(image):
  """torchvision's rgb_to_grayscale on uint8: the weighted sum truncated to uint8, as float
  [H, W, 1]; a 1-channel image is its own grayscale."""
  x = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    return x
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  return tf.cast(tf.cast(0.2989 * r + 0.587 * g + 0.114 * b, tf.uint8), tf.float32)


def _transform(image, a0, a1, a2, b0, b1, b2):
  """Output pixel (x, y) (column, row indices) takes the input pixel nearest to
  (a0 x + a1 y + a2, b0 x + b1 y + b2); outside the image: 0."""
  transform = tf.cast(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(0.0), interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


# --- the ops: (uint8 image, signed magnitude as a float32 scalar) -> uint8 image --------------

def identity(image, magnitude=None):
  del magnitude
  return image


def shear_x(image, magnitude):
  """x_in = x + m * (y + 0.5): torchvision's affine(shear=atan(m)) about the top-left corner."""
  return _transform(image, 1.0, magnitude, 0.5 * magnitude, 0.0, 1.0, 0.0)


def shear_y(image, magnitude):
  return _transform(image, 1.0, 0.0, 0.0, magnitude, 1.0, 0.5 * magnitude)


def translate_x(image, magnitude):
  """Shift right by int(magnitude) pixels (truncated, as torchvision's int())."""
  shift = tf.cast(tf.cast(magnitude, tf.int32), tf.float32)
  return _transform(image, 1.0, 0.0, -shift, 0.0, 1.0, 0.0)


def translate_y(image, magnitude):
  shift = tf.cast(tf.cast(magnitude, tf.int32), tf.float32)
  return _transform(image, 1.0, 0.0, 0.0, 0.0, 1.0, -shift)


def rotate(image, degrees):
  """Rotate by `degrees` about the image centre (the policies draw the direction)."""
  h, w, _ = _static_hwc(image)
  cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
  theta = degrees * (math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  # input = R(-theta) (output - centre) + centre, in (x right, y down) coordinates.
  return _transform(image, cos, -sin, cx - cos * cx + sin * cy,
                    sin, cos, cy - sin * cx - cos * cy)


def brightness(image, magnitude):
  return _blend(image, 0.0, magnitude)


def color(image, magnitude):
  if image.shape[-1] == 1:
    return image
  return _blend(image, _grayscale(image), magnitude)


def contrast(image, magnitude):
  return _blend(image, tf.reduce_mean(_grayscale(image)), magnitude)


def sharpness(image, magnitude):
  """Blend with the 3x3 smoothing (1 1 1 / 1 5 1 / 1 1 1) / 13 of the interior, border
  pixels kept (torchvision's adjust_sharpness)."""
  h, w, c = _static_hwc(image)
  if h <= 2 or w <= 2:
    return image
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
  blurred = tf.round(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0])
  interior = tf.pad(tf.ones([h - 2, w - 2, c], tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior, tf.pad(blurred, [[1, 1], [1, 1], [0, 0]]), x)
  return _blend(image, degenerate, magnitude)


def posterize(image, bits):
  """Keep the top `bits` bits of every value (8 = identity)."""
  bits = tf.cast(bits, tf.int32)
  mask = tf.cast(tf.bitwise.left_shift(tf.constant(255, tf.int32), 8 - bits) & 255, tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
  """Invert the values >= threshold."""
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def autocontrast(image, magnitude=None):
  """Stretch every channel to 0..255 (a constant channel is kept)."""
  del magnitude
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=(0, 1), keepdims=True)
  hi = tf.reduce_max(x, axis=(0, 1), keepdims=True)
  flat = hi <= lo
  # 255 * (1 / range) as torchvision's `bound / tensor` (a reciprocal, then a product).
  scale = tf.where(flat, 1.0, tf.math.reciprocal(tf.where(flat, 1.0, hi - lo)) * 255.0)
  return _to_uint8((x - tf.where(flat, 0.0, lo)) * scale)


def _equalize_channel(channel):
  x = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(x, minlength=256, maxlength=256, dtype=tf.int32)
  step = (tf.size(x) - hist[tf.reduce_max(x)]) // 255
  safe = tf.maximum(step, 1)
  lut = (tf.cumsum(hist) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step == 0, channel, tf.cast(tf.gather(lut, x), tf.uint8))


def equalize(image, magnitude=None):
  """Histogram equalisation per channel (PIL's / torchvision's lookup table)."""
  del magnitude
  _, _, c = _static_hwc(image)
  return tf.stack([_equalize_channel(image[..., i]) for i in range(c)], axis=-1)


_FUNCTIONS = {"identity": identity, "shear_x": shear_x, "shear_y": shear_y,
              "translate_x": translate_x, "translate_y": translate_y, "rotate": rotate,
              "brightness": brightness, "color": color, "contrast": contrast,
              "sharpness": sharpness, "posterize": posterize, "solarize": solarize,
              "autocontrast": autocontrast, "equalize": equalize}


def op_magnitude(name: str, level, sign, space: Space, height: int, width: int):
  """What op `name` is called with at `level` (0..1) of `space`, with `sign` (+-1) applied
  to the signed ops: shear tan, pixels, degrees, enhance factor - 1, bits kept, threshold."""
  level = tf.cast(level, tf.float32)
  sign = tf.cast(sign, tf.float32)
  if name in ("shear_x", "shear_y"):
    return sign * level * space.shear
  if name in ("translate_x", "translate_y"):
    side = width if name == "translate_x" else height
    size = space.translate * side if space.translate_relative else space.translate
    return sign * level * size
  if name == "rotate":
    return sign * level * space.rotate
  if name in ("brightness", "color", "contrast", "sharpness"):
    return sign * level * space.enhance
  if name == "posterize":
    return 8.0 - tf.round(level * space.posterize_bits)   # torch.round: half to even too
  if name == "solarize":
    return 255.0 * (1.0 - level)
  return tf.constant(0.0)


def apply_op(image, op, level, sign, space: Space = RANDAUGMENT):
  """Op number `op` (an index of OPS, a scalar tensor or int) at `level` with `sign`."""
  h, w, _ = _static_hwc(image)
  branches = [
      (lambda name=name: _FUNCTIONS[name](image, op_magnitude(name, level, sign, space, h, w)))
      for name in OPS]
  out = tf.switch_case(tf.cast(op, tf.int32), branches)
  out.set_shape(image.shape)
  return out


def _choice(seed):
  """(op index, sign +-1) drawn from `seed`."""
  op = tf.random.stateless_uniform([], _fold(seed, _OP), 0, len(OPS), dtype=tf.int32)
  flip = tf.random.stateless_uniform([], _fold(seed, _SIGN), 0, 2, dtype=tf.int32)
  return op, tf.where(flip == 1, -1.0, 1.0)


def randaugment_choices(seed, num_ops: int):
  """[(op, sign)] of the num_ops ops randaugment applies for `seed`, in order."""
  return [_choice(_fold(seed, i)) for i in range(num_ops)]


def randaugment(image, seed, num_ops: int, magnitude: float):
  """num_ops ops, each drawn uniformly from OPS, at magnitude / 10 of RANDAUGMENT's ranges."""
  level = magnitude / 10.0
  for op, sign in randaugment_choices(seed, num_ops):
    image = apply_op(image, op, level, sign, RANDAUGMENT)
  return image


def trivial_augment_choice(seed):
  """(op, level, sign) trivial_augment applies for `seed`: level = a uniform bin / 30."""
  op, sign = _choice(seed)
  bin_ = tf.random.stateless_uniform([], _fold(seed, _LEVEL), 0, TRIVIAL_AUGMENT_BINS,
                                     dtype=tf.int32)
  return op, tf.cast(bin_, tf.float32) / (TRIVIAL_AUGMENT_BINS - 1), sign


def trivial_augment(image, seed):
  """One op drawn uniformly from OPS at a uniformly drawn level of TRIVIAL_AUGMENT_WIDE."""
  op, level, sign = trivial_augment_choice(seed)
  return apply_op(image, op, level, sign, TRIVIAL_AUGMENT_WIDE)


def erasing_box(seed, height: int, width: int, *, area_range=(0.02, 0.33),
                ratio_range=(0.3, 3.3), attempts: int = 10):
  """(found, top, left, h, w) of torchvision's RandomErasing.get_params: up to `attempts`
  (area, log-aspect) draws, the first whose box fits inside the image."""
  area = float(height * width)
  areas = area * tf.random.stateless_uniform([attempts], _fold(seed, _ERASE_AREA),
                                             area_range[0], area_range[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], _fold(seed, _ERASE_RATIO), math.log(ratio_range[0]), math.log(ratio_range[1])))
  hs = tf.cast(tf.round(tf.sqrt(areas * aspect)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(areas / aspect)), tf.int32)
  fits = (hs < height) & (ws < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = hs[first], ws[first]
  found = tf.reduce_any(fits)
  h, w = tf.where(found, h, 0), tf.where(found, w, 0)
  top = tf.random.stateless_uniform([], _fold(seed, _ERASE_TOP), 0, height - h + 1,
                                    dtype=tf.int32)
  left = tf.random.stateless_uniform([], _fold(seed, _ERASE_LEFT), 0, width - w + 1,
                                     dtype=tf.int32)
  return found, top, left, h, w


def random_erasing(image, seed, probability: float, mean, std, **box_kwargs):
  """With `probability`, one rectangle (erasing_box) replaced by round(mean + std * N(0, 1))
  per pixel and channel, clipped to uint8. mean/std: per channel (or one value), pixel units,
  in the image's channel order."""
  h, w, c = _static_hwc(image)
  apply = tf.random.stateless_uniform([], _fold(seed, _ERASE_APPLY)) < probability
  found, top, left, eh, ew = erasing_box(seed, h, w, **box_kwargs)

  def erase():
    noise = tf.random.stateless_normal([eh, ew, c], _fold(seed, _ERASE_NOISE))
    noise = tf.constant(mean, tf.float32) + tf.constant(std, tf.float32) * noise
    patch = tf.cast(tf.clip_by_value(tf.round(noise), 0.0, 255.0), tf.uint8)
    pad = [[top, h - top - eh], [left, w - left - ew], [0, 0]]
    inside = tf.pad(tf.ones([eh, ew, c], tf.bool), pad)
    return tf.where(inside, tf.pad(patch, pad), image)

  out = tf.cond(apply & found, erase, lambda: image)
  out.set_shape(image.shape)
  return out


def augment_policy(image, seed, *, randaugment_ops: int = 0, randaugment_magnitude: float = 9.0,
                   trivial_augment_on: bool = False):
  """The configured policy (RandAugment or TrivialAugment, or none) on an RGB uint8 image."""
  if randaugment_ops > 0:
    return randaugment(image, seed, randaugment_ops, randaugment_magnitude)
  if trivial_augment_on:
    return trivial_augment(image, seed)
  return image
