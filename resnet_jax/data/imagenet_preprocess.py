"""ImageNet-style preprocessing in TF ops, on encoded JPEG/PNG bytes, for tf.data.

Train: random-resized crop ("Inception crop") sampled by `stateless_sample_distorted_bounding_box`
(area 8%..100% of the image, aspect ratio 3/4..4/3, 10 attempts, then a center crop), decoded
straight from the JPEG data so only the crop's pixels are decoded (the same pixels as a full
decode), resized to image_size and randomly flipped. All randomness comes from the
per-example seed, so the train stream stays a pure function of (seed, step) like the rest of
input_pipeline.py.

Eval: torchvision's `Resize(floor(image_size / crop_pct)) + CenterCrop(image_size)`: the
shorter side resized (longer side truncated to int, as torchvision does), and the center taken
with torchvision's offsets (round half to even). Two resizers:

- antialias=True (`data.antialias`, predict): the pixels torchvision (and timm, bicubic)
  compute on PIL images, bit for bit. `pil_resize` is Pillow's resampling done in TF ops: the
  same filter supports, the same float64 coefficients rounded to the same 22-bit integers, the
  same two integer passes with 8-bit values in between, in Pillow's order, each rounded half
  up and clipped as Pillow does. Only the crop's output pixels are computed, from the input
  window they read: ~1.3x the CPU time of TF's antialiased resize of the whole image, which
  it replaces (that one differed from PIL by up to 1 level bilinear, 13 bicubic, after the
  same decode). Transient memory: the passes gather their taps in chunks of at most 16 MB.
- antialias=False: TF's reference recipe, `tf.image.resize` bilinear without antialiasing
  (downscaled images differ from PIL by ~2-6 levels on average), about 3x cheaper.

JPEG decoding, train and eval: libjpeg's accurate integer IDCT (dct_method INTEGER_ACCURATE,
JDCT_ISLOW) with fancy upsampling, which is what PIL uses: the decoded pixels are PIL's
`Image.open(...).convert("RGB")`, grey JPEGs included (R=G=B). TF's default, the fast IDCT
(JDCT_IFAST), is ~1 level off on average and up to 17, and with libjpeg-turbo's SIMD it is
no faster (measured: experiments/eval_preprocess_vs_pil.py), so train decodes as eval does:
the pixels the model trains on are the ones PIL-based evaluation feeds it. The one difference
left is CMYK JPEGs, which TF converts to RGB inside its decoder, rounding down where Pillow
rounds to nearest (<= 1 level before the resize; the 22 CMYK files TF's ImageNet build
script lists are all in the train set). PNG and the other formats are lossless.

Output: uint8 HxWx3, RGB or (channel_order="BGR", Caffe-style weights) BGR. Normalisation with
mean/std happens on device, in the output channel order.

Note the crop sampler is TF's, not torchvision's: TF draws the aspect ratio uniformly and then
the height uniformly between the heights giving the min and max area; torchvision draws area
and log-aspect uniformly. Both give the same ranges; the distributions within them differ.
"""

import math

import tensorflow as tf

# libjpeg's accurate integer IDCT (JDCT_ISLOW), what PIL decodes with; TF's default ("") is
# the fast one (JDCT_IFAST). Train uses PIL's too: same cost, the same pixels as eval.
PIL_DCT_METHOD = "INTEGER_ACCURATE"
TRAIN_DCT_METHOD = PIL_DCT_METHOD

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 10
CHANNEL_ORDERS = ("RGB", "BGR")
INTERPOLATIONS = ("bilinear", "bicubic")
RESIZERS = ("auto", "pil", "tf")


def eval_resize_size(image_size: int, crop_pct: float) -> int:
  """The shorter side before the center crop: 256 for 224 at 0.875 (timm's floor rule; the
  1e-6 makes 224 / (224 / 232) give 232, torchvision's V2 size, not 231)."""
  return int(math.floor(image_size / crop_pct + 1e-6))


def decode_rgb(encoded, *, dct_method: str = PIL_DCT_METHOD):
  """Encoded image bytes -> uint8 [H, W, 3], the pixels of PIL's Image.open(...).convert("RGB").

  JPEG: libjpeg with dct_method (PIL's IDCT by default, and fancy upsampling as PIL); grey
  JPEGs come out as R=G=B like PIL's convert. Anything else tf.io.decode_image reads (PNG, BMP,
  GIF's first frame) is lossless: the same pixels as PIL's, alpha dropped as convert("RGB")
  drops it.
  """
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=dct_method),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


# libjpeg's fancy upsampling of subsampled chroma (4:2:0, 4:2:2) treats a cropped decode's
# left and right edges as the image's, so decode_and_crop_jpeg's first or last column can
# differ from a full decode's by a level or two (on 217 of 600 random windows of the sample
# photos). It reads one chroma sample (2 pixels) past each pixel: decoding a 4-pixel margin
# around the window and cutting it off gives the full decode's pixels (600 of 600), i.e.
# PIL's, for ~4% more train decode time.
_JPEG_WINDOW_MARGIN = 4


def _decode_jpeg_window(encoded, shape, top, left, h, w, dct_method: str):
  """The pixels [top:top+h, left:left+w] of a full decode of a JPEG of `shape`, decoding
  only around them."""
  m = _JPEG_WINDOW_MARGIN
  y0, x0 = tf.maximum(top - m, 0), tf.maximum(left - m, 0)
  y1, x1 = tf.minimum(top + h + m, shape[0]), tf.minimum(left + w + m, shape[1])
  pixels = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y0, x0, y1 - y0, x1 - x0]),
                                         channels=3, dct_method=dct_method)
  return pixels[top - y0:top - y0 + h, left - x0:left - x0 + w]


def _decode_window(encoded, window_fn, dct_method: str = PIL_DCT_METHOD):
  """The pixels of window_fn(height, width) -> (top, left, h, w) of an encoded image: those
  of a full decode, cropped.

  JPEG: decode_and_crop_jpeg runs IDCT, upsampling and colour conversion for the window's
  blocks only and stops reading after its last row, which is most of the train-time saving
  for small crops. Anything else tf.io.decode_image reads (PNG, BMP, GIF): full decode, then
  slice.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    return _decode_jpeg_window(encoded, shape, *window_fn(shape[0], shape[1]), dct_method)

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


def _check_interpolation(interpolation: str):
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def _resize_uint8(image, size, antialias: bool, interpolation: str = "bilinear"):
  """TF's resize (the fast path): float32 filters, rounded half to even once at the end."""
  _check_interpolation(interpolation)
  image = tf.image.resize(image, size, method=interpolation, antialias=antialias)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# --- Pillow's resampling (libImaging/Resample.c), in TF ops ------------------------------------
#
# Per axis, output pixel i of an in_size -> out_size resize (scale = in_size / out_size,
# filterscale = max(scale, 1), support = filter support * filterscale) reads the input pixels
# [xmin, xmax) with center = (i + 0.5) * scale, xmin = max(int(center - support + 0.5), 0),
# xmax = min(int(center + support + 0.5), in_size), weights filter((x - center + 0.5) /
# filterscale) normalised by their sequential sum, then scaled by 2**22 and rounded half away
# from zero to int32. A pass sums uint8 * weight in int32 from 2**21, shifts right by 22 and
# clips to 0..255. The two passes run horizontal first, except (Pillow >= 13) when the height
# loses more than twice as many pixels as the width, then vertical first (the rule of the
# released 13.0.0, read from its binary and checked on 2,984 random resizes); Pillow <= 12
# always ran horizontal first. For torchvision's Resize(size) that is only a portrait taller
# than 2:1 and wider than size: Pillow 13 and 12 themselves differ there (measured on the
# sample photos: bilinear <= 1 level on ~10% of the pixels, bicubic up to ~8). Default:
# Pillow 13's order. A pass Pillow skips (same size) is an exact identity here.

_PIL_PRECISION_BITS = 22   # 32 - 8 - 2: 8 bits of result, 2 for the negative lobes' overflow
_PIL_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _pil_filter(x, interpolation: str):
  """Pillow's bilinear (triangle) and bicubic (Keys, a = -0.5) filters, in float64, with
  Pillow's order of operations."""
  x = tf.abs(x)
  zero = tf.zeros_like(x)
  if interpolation == "bilinear":
    return tf.where(x < 1.0, 1.0 - x, zero)
  a = -0.5
  near = (((a + 2.0) * x - (a + 3.0)) * x) * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, zero))


def _pil_support(in_size, out_size, interpolation: str):
  """(scale, filterscale, support, ksize) of Pillow's precompute_coeffs, float64 / int32."""
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = _PIL_SUPPORT[interpolation] * filterscale
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  return scale, filterscale, support, ksize


def _pil_bounds(in_size, out_size, first, count, interpolation: str):
  """[xmin, xmax) of output pixels first..first+count-1: the input pixels they read."""
  scale, _, support, _ = _pil_support(in_size, out_size, interpolation)
  center = (tf.cast(first + tf.range(count), tf.float64) + 0.5) * scale
  xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)    # casts truncate, as C's
  xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
  return center, xmin, xmax


def pil_coefficients(in_size, out_size, interpolation: str = "bilinear", first=0, count=None):
  """Pillow's 8-bit resampling weights for output pixels first..first+count-1 (all by default)
  of an in_size -> out_size resize along one axis: (indices, weights), int32 [count, ksize]:
  the input pixel each tap reads and its weight in units of 2**-22 (0 past the support)."""
  _check_interpolation(interpolation)
  count = out_size - first if count is None else count
  _, filterscale, _, ksize = _pil_support(in_size, out_size, interpolation)
  center, xmin, xmax = _pil_bounds(in_size, out_size, first, count, interpolation)
  taps = tf.range(ksize)
  pos = xmin[:, None] + taps[None, :]
  w = _pil_filter((tf.cast(pos, tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale),
                  interpolation)
  w = tf.where(taps[None, :] < (xmax - xmin)[:, None], w, tf.zeros_like(w))
  # Pillow sums the weights in order; cumsum does too (reduce_sum pairs them differently,
  # which moves the last bit and, rarely, a rounded weight).
  total = tf.math.cumsum(w, axis=1)[:, -1:]
  w = tf.where(tf.not_equal(total, 0.0), w / total, w)
  w = tf.sign(w) * tf.floor(tf.abs(w) * float(1 << _PIL_PRECISION_BITS) + 0.5)
  # Taps past a pixel's support (weight 0) read its last input pixel: always in the window.
  return tf.minimum(pos, xmax[:, None] - 1), tf.cast(w, tf.int32)


# The taps (int32) one chunk of a pass gathers at most: bounds a pass's transient memory at
# ~16 MB whatever the image's size. An ImageNet-sized image is one chunk.
_PIL_MAX_TAPS = 1 << 22


def _pil_rows_pass(image, indices, weights):
  """One of Pillow's separable passes, along the rows (axis 0) of [H, W, C] pixel values:
  output row i = sum_k weights[i, k] * image[indices[i, k]] in int32 from 2**21, >> 22,
  clipped to 0..255. Images in and out are float32 holding those integers (exactly).
  Output rows are computed in chunks of at most _PIL_MAX_TAPS gathered taps."""
  shape = tf.shape(image)
  row = shape[1] * shape[2]
  image = tf.cast(tf.reshape(image, [shape[0], row]), tf.int32)
  n, k = tf.shape(indices)[0], tf.shape(indices)[1]
  rows = tf.maximum(_PIL_MAX_TAPS // (k * row), 1)

  def chunk(i, out):
    first, last = i * rows, tf.minimum(i * rows + rows, n)
    taps = tf.gather(image, indices[first:last])                        # [rows, k, W * C]
    acc = tf.linalg.matmul(weights[first:last, None, :], taps)[:, 0]    # exact, int32
    acc = tf.bitwise.right_shift(acc + (1 << (_PIL_PRECISION_BITS - 1)), _PIL_PRECISION_BITS)
    return i + 1, out.write(i, tf.cast(tf.clip_by_value(acc, 0, 255), tf.float32))

  chunks = (n + rows - 1) // rows
  out = tf.TensorArray(tf.float32, size=chunks, infer_shape=False,
                       element_shape=tf.TensorShape([None, None]))
  _, out = tf.while_loop(lambda i, _: i < chunks, chunk, (tf.constant(0), out))
  return tf.reshape(out.concat(), [n, shape[1], shape[2]])


def _pil_vertical_first(height, width, out_h, out_w, pillow_12_order: bool = False):
  if pillow_12_order:
    return tf.constant(False)
  lost_h, lost_w = height - out_h, width - out_w
  return tf.logical_and(lost_h > 0, lost_h > 2 * lost_w)


def _pil_plan(height, width, out_h, out_w, window, interpolation, pillow_12_order=False):
  """Everything pil_resize needs besides the pixels: coefficients for the output window,
  the input window (top, left, h, w) they read, and the pass order."""
  top, left, crop_h, crop_w = window
  v_idx, v_w = pil_coefficients(height, out_h, interpolation, top, crop_h)
  h_idx, h_w = pil_coefficients(width, out_w, interpolation, left, crop_w)
  r0, c0 = v_idx[0, 0], h_idx[0, 0]   # indices grow along both axes of each table
  r1, c1 = tf.reduce_max(v_idx[-1]) + 1, tf.reduce_max(h_idx[-1]) + 1
  return dict(v=(v_idx - r0, v_w), h=(h_idx - c0, h_w), read=(r0, c0, r1 - r0, c1 - c0),
              vertical_first=_pil_vertical_first(height, width, out_h, out_w, pillow_12_order))


def _pil_apply(pixels, plan):
  """The planned passes over the input window's pixels."""
  (v_idx, v_w), (h_idx, h_w) = plan["v"], plan["h"]
  vertical_first = plan["vertical_first"]
  # Passes run along rows only (gathering whole rows is several times faster than columns):
  # the horizontal one on the transposed image. Vertical first: rows(x, v), transpose,
  # rows(., h), transpose. Horizontal first: transpose, rows(., h), transpose, rows(., v).
  # One program for both, without a tf.cond (tf.data runs a cond's branches as separate
  # functions, slower; and grappler fails on the passes' while loops inside one): the order
  # picks a transpose permutation (the identity costs nothing) and the coefficient tables.
  identity, swap = tf.constant([0, 1, 2]), tf.constant([1, 0, 2])
  first_perm = tf.where(vertical_first, identity, swap)
  last_perm = tf.where(vertical_first, swap, identity)
  (i1, w1, n1), (i2, w2, n2) = _pil_order(vertical_first, (v_idx, v_w), (h_idx, h_w))
  # Images in between are float32: oneDNN's transpose refuses integer types with an error
  # line (once per process). The cast goes through int32, the size of float32, or grappler
  # would move it after the transpose to transpose the smaller uint8.
  x = tf.transpose(tf.cast(tf.cast(pixels, tf.int32), tf.float32), first_perm)
  x = _pil_rows_pass(x, i1, w1)[:n1]
  x = _pil_rows_pass(tf.transpose(x, swap), i2, w2)[:n2]
  # (And grappler moves a narrowing cast before a transpose: the no-op minimum keeps it after.)
  return tf.cast(tf.minimum(tf.transpose(x, last_perm), 255.0), tf.uint8)


def _pil_order(vertical_first, v, h):
  """The (indices, weights, count) of the first and second pass, without a tf.cond: both
  tables padded to one shape (weight-0 taps, extra rows cut off after the pass) and picked."""
  count = lambda t: tf.shape(t[0])[0]
  n = tf.maximum(count(v), count(h))
  k = tf.maximum(tf.shape(v[0])[1], tf.shape(h[0])[1])

  def pad(t):
    return tf.pad(t, [[0, n - tf.shape(t)[0]], [0, k - tf.shape(t)[1]]])

  indices = tf.stack([pad(h[0]), pad(v[0])])
  weights = tf.stack([pad(h[1]), pad(v[1])])
  counts = tf.stack([count(h), count(v)])
  first = tf.cast(vertical_first, tf.int32)
  return ((indices[first], weights[first], counts[first]),
          (indices[1 - first], weights[1 - first], counts[1 - first]))


def pil_resize(image, size, interpolation: str = "bilinear", *, window=None,
               pillow_12_order: bool = False):
  """uint8 [H, W, C] -> uint8 [out_h, out_w, C] exactly as Pillow's `Image.resize(size[::-1],
  BILINEAR / BICUBIC)` (8-bit images; Pillow 13's pass order, or pillow_12_order=True for
  Pillow <= 12's). window=(top, left, h, w): only that part of the output, the same pixels as
  cropping the full result, computed from the input pixels it needs."""
  _check_interpolation(interpolation)
  shape = tf.shape(image)
  out_h, out_w = size[0], size[1]
  window = (0, 0, out_h, out_w) if window is None else window
  plan = _pil_plan(shape[0], shape[1], out_h, out_w, window, interpolation, pillow_12_order)
  r0, c0, rh, cw = plan["read"]
  return _pil_apply(image[r0:r0 + rh, c0:c0 + cw], plan)


def to_channel_order(image, channel_order: str):
  """An RGB image (..., 3) in channel_order: BGR for Caffe-style weights."""
  if channel_order not in CHANNEL_ORDERS:
    raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
  return image[..., ::-1] if channel_order == "BGR" else image


def train_image(encoded, seed, image_size: int, *, random_flip: bool = True,
                antialias: bool = False, channel_order: str = "RGB",
                area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RATIO_RANGE,
                max_attempts: int = MAX_ATTEMPTS, dct_method: str = TRAIN_DCT_METHOD):
  """Encoded image bytes -> uint8 [image_size, image_size, 3] random-resized crop.

  seed: int32/int64 [2], the example's stateless seed; the same seed gives the same crop and
  flip, whatever thread or process runs it. dct_method: the JPEG IDCT (PIL's by default, as
  eval; "" for TF's default fast one).
  """
  seed = tf.convert_to_tensor(seed)
  crop_seed = tf.random.experimental.stateless_fold_in(seed, 0)
  flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
  image = _decode_window(encoded, lambda h, w: random_crop_window(
      h, w, crop_seed, area_range=area_range, aspect_ratio_range=aspect_ratio_range,
      max_attempts=max_attempts), dct_method)
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


def eval_crop_offsets(new_h, new_w, image_size: int):
  """torchvision's CenterCrop offsets: int(round((new - size) / 2.0)), round half to even."""
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2), tf.int32)
  return top, left


def _eval_pil(encoded, image_size, resize_size, interpolation, dct_method):
  """Resize(resize_size) + CenterCrop(image_size) as torchvision computes them on PIL images:
  only the crop's output pixels, from the input window they read.

  The whole image is decoded: decode_and_crop_jpeg of the window saves only ~5% of an
  ImageNet-sized decode here (the window is most of the image), and the shape it needs
  first would put the rest of the work inside a tf.cond, which costs more than that in
  tf.data (measured: experiments/eval_preprocess_vs_pil.py)."""
  image = decode_rgb(encoded, dct_method=dct_method)
  shape = tf.shape(image)
  new_h, new_w = eval_resize_shape(shape[0], shape[1], resize_size)
  top, left = eval_crop_offsets(new_h, new_w, image_size)
  plan = _pil_plan(shape[0], shape[1], new_h, new_w, (top, left, image_size, image_size),
                   interpolation)
  r0, c0, rh, cw = plan["read"]
  return _pil_apply(image[r0:r0 + rh, c0:c0 + cw], plan)


def eval_image(encoded, image_size: int, *, crop_pct: float = 0.875, antialias: bool = False,
               channel_order: str = "RGB", interpolation: str = "bilinear",
               resizer: str = "auto", dct_method: str = PIL_DCT_METHOD):
  """Encoded image bytes -> uint8 [image_size, image_size, 3]: shorter side resized to
  image_size / crop_pct, then the center image_size square (torchvision's offsets).

  interpolation: "bilinear" (torchvision's weights) or "bicubic" (most timm weights).
  resizer: "auto" = "pil" with antialias, else "tf". "pil": Pillow's resampling, bit-exact
  (antialiased whatever `antialias` says, as PIL always is); "tf": tf.image.resize with
  `antialias` (TF's filters: with antialias, what this function did before "pil" existed).
  dct_method: the JPEG IDCT, PIL's by default ("": TF's default fast IDCT).
  """
  _check_interpolation(interpolation)
  if resizer not in RESIZERS:
    raise ValueError(f"resizer must be one of {RESIZERS}, got {resizer!r}")
  if resizer == "auto":
    resizer = "pil" if antialias else "tf"
  resize_size = eval_resize_size(image_size, crop_pct)
  if resize_size < image_size:
    raise ValueError(f"crop_pct={crop_pct} resizes to {resize_size} < image_size={image_size}")
  if resizer == "pil":
    image = _eval_pil(encoded, image_size, resize_size, interpolation, dct_method)
  else:
    image = decode_rgb(encoded, dct_method=dct_method)
    shape = tf.shape(image)
    new_h, new_w = eval_resize_shape(shape[0], shape[1], resize_size)
    image = _resize_uint8(image, tf.stack([new_h, new_w]), antialias, interpolation)
    top, left = eval_crop_offsets(new_h, new_w, image_size)
    image = image[top:top + image_size, left:left + image_size]
  image = to_channel_order(image, channel_order)
  image.set_shape((image_size, image_size, 3))
  return image
