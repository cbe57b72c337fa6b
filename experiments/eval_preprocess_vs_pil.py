"""Eval preprocessing vs torchvision's Resize + CenterCrop on PIL images: pixels and cost.

Reference: what torchvision's eval transform (timm's, for bicubic) computes on a PIL image:
Image.open(bytes).convert("RGB"), shorter side resized to 256 (crop_pct 0.875) or 232
(torchvision's V2 weights, crop_pct 224/232) with PIL's BILINEAR or BICUBIC, longer side
int(size * long / short), center crop 224 at int(round((new - 224) / 2.0)).

Inputs: the two real photographs that ship with scikit-learn (china.jpg, flower.jpg, 427x640),
resized / cropped / transposed / made grey with PIL to other sizes and re-encoded as JPEG at
several qualities, so every input is a JPEG file like ImageNet's.

Ours: imagenet_preprocess.eval_image(bytes, 224, crop_pct=..., interpolation=..., ...) with
  pil        antialias=True: data.antialias=true and predict (PIL's IDCT, Pillow's resampling
             in TF ops, only the 224 crop's output pixels computed)
  tf_aa      resizer="tf", antialias=True: TF's antialiased resize (antialias=True before), PIL's IDCT
  tf_aa_fast the same with TF's default fast IDCT: exactly the old antialias=True path
  tf_fast    antialias=False: TF's reference recipe (bilinear, no antialiasing), PIL's IDCT
Timing: CPU seconds per image (time.process_time over the whole process, so tf.data's threads
count) through a one-thread tf.data map, on ImageNet-sized proxies (375x500 crops of the
photos at --quality, like experiments/input_pipeline_throughput.py), best of --repeats; with
PIL itself (the reference transform in Python) for comparison.

  PYTHONPATH=. python experiments/eval_preprocess_vs_pil.py [--quality 90] [--repeats 3]
"""

import argparse
import io
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The PIL reference, shared with tests/test_pixel_exact.py.
sys.path.insert(0, os.path.join(REPO, "tests"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from resnet_jax.data import imagenet_preprocess as ipp  # noqa: E402

from pil_reference import PIL_FILTERS, jpeg, torchvision_eval  # noqa: E402

SETTINGS = {  # resize size -> crop_pct giving it for a 224 crop
    256: 0.875,
    232: 224 / 232,
}
METHODS = {
    "pil": dict(antialias=True),
    "tf_aa": dict(antialias=True, resizer="tf"),
    "tf_aa_fast": dict(antialias=True, resizer="tf", dct_method=""),
    "tf_fast": dict(antialias=False),
}


def sample_cases(qualities):
  """[(label, JPEG bytes)]: the sample photos at several sizes, qualities and modes."""
  from sklearn.datasets import load_sample_image
  cases = []
  for name in ("china.jpg", "flower.jpg"):
    photo = load_sample_image(name)
    image = Image.fromarray(photo)
    variants = {
        "427x640": photo,
        "640x427": np.ascontiguousarray(photo.transpose(1, 0, 2)),
        "333x501": np.asarray(image.resize((501, 333), Image.LANCZOS)),
        "257x259": np.asarray(image.crop((100, 50, 359, 307))),
        "500x375": np.asarray(image.resize((500, 375), Image.BICUBIC)),
        "640x250": np.ascontiguousarray(photo.transpose(1, 0, 2)[:, 60:310]),   # > 2:1
        "100x150": np.asarray(image.resize((150, 100), Image.BILINEAR)),       # upscaled
    }
    for label, array in variants.items():
      for q in qualities:
        cases.append((f"{name[:-4]} {label} q{q}", jpeg(array, q)))
    cases.append((f"{name[:-4]} 333x501 grey q75", jpeg(variants["333x501"], 75, "L")))
    cases.append((f"{name[:-4]} 427x640 4:4:4 q90", jpeg(photo, 90, subsampling=0)))
    cases.append((f"{name[:-4]} 427x640 4:2:2 progressive q85",
                  jpeg(photo, 85, subsampling=1, progressive=True)))
  return cases


def cmyk_case():
  """A CMYK JPEG with real black (PIL writes Adobe-inverted CMYK, as Photoshop does)."""
  from sklearn.datasets import load_sample_image
  rgb = load_sample_image("flower.jpg").astype(np.int32)
  k = 255 - rgb.max(-1, keepdims=True)
  cmy = (255 - rgb - k) * 3 // 4
  cmyk = np.concatenate([cmy, k], -1).clip(0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(cmyk, mode="CMYK").save(out, format="JPEG", quality=90)
  return "flower 427x640 CMYK q90", out.getvalue()


def compare(cases, title):
  print(f"{title}\n")
  print("| image | resize | interpolation | " + " | ".join(
      f"{m} max / mean" for m in METHODS) + " |")
  print("|---|---|---|" + "---|" * len(METHODS))
  summary = {}
  for label, encoded in cases:
    for resize, crop_pct in SETTINGS.items():
      for interpolation in PIL_FILTERS:
        ref = torchvision_eval(encoded, resize, 224, interpolation).astype(np.int32)
        cells = []
        for method, kw in METHODS.items():
          ours = ipp.eval_image(encoded, 224, crop_pct=crop_pct, interpolation=interpolation,
                                **kw).numpy().astype(np.int32)
          diff = np.abs(ours - ref)
          summary.setdefault((method, interpolation), []).append((diff.max(), diff.mean()))
          cells.append(f"{diff.max()} / {diff.mean():.4f}")
        print(f"| {label} | {resize} | {interpolation} | " + " | ".join(cells) + " |")
  print()
  print("| method | interpolation | images x settings | max | mean of means | worst mean |")
  print("|---|---|---|---|---|---|")
  for (method, interpolation), rows in summary.items():
    maxes, means = zip(*rows)
    print(f"| {method} | {interpolation} | {len(rows)} | {max(maxes)} | {np.mean(means):.4f} "
          f"| {max(means):.4f} |")


def compare_decode(cases):
  """The decode alone: PIL's Image.open(...).convert("RGB") vs ours and vs TF's default IDCT."""
  rows = {"decode_rgb (INTEGER_ACCURATE)": [], "tf.io.decode_jpeg default (fast IDCT)": []}
  for _, encoded in cases:
    pil = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")).astype(np.int32)
    for label, ours in zip(rows, (ipp.decode_rgb(encoded),
                                  tf.io.decode_jpeg(encoded, channels=3))):
      diff = np.abs(ours.numpy().astype(np.int32) - pil)
      rows[label].append((diff.max(), diff.mean(), diff.any()))
  print("| decoder | images | identical to PIL | max | mean of means |")
  print("|---|---|---|---|---|")
  for label, values in rows.items():
    maxes, means, differs = zip(*values)
    print(f"| {label} | {len(values)} | {len(values) - sum(differs)} | {max(maxes)} | "
          f"{np.mean(means):.4f} |")


def proxies(n, quality):
  from sklearn.datasets import load_sample_image
  photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
  rng = np.random.RandomState(0)
  out = []
  for i in range(n):
    photo = photos[i % 2]
    top, left = rng.randint(0, photo.shape[0] - 375 + 1), rng.randint(0, photo.shape[1] - 500 + 1)
    crop = photo[top:top + 375, left:left + 500]
    out.append(jpeg(np.ascontiguousarray(crop[:, ::-1] if rng.rand() < 0.5 else crop),
                        quality))
  return out


def cpu_per_image(fn, encoded, repeats):
  """Best-of-repeats CPU seconds and wall seconds per image of fn over a one-thread tf.data map."""
  ds = tf.data.Dataset.from_tensor_slices(encoded).map(fn, num_parallel_calls=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  for _ in ds.take(8):     # trace and warm up
    pass
  best = None
  for _ in range(repeats):
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in ds:
      pass
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    best = (cpu, wall) if best is None or cpu < best[0] else best
  return best[0] / len(encoded), best[1] / len(encoded)


def timings(n, quality, repeats):
  encoded = proxies(n, quality)
  kb = np.mean([len(e) for e in encoded]) / 1024
  print(f"\nTimings: {n} JPEGs 375x500 (portrait and landscape crops of the photos, quality "
        f"{quality}, mean {kb:.1f} KB), crop 224 of 256; one tf.data thread; best of "
        f"{repeats}; {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")
  seed = tf.constant([1, 2], tf.int64)
  rows = [
      ("eval pil bilinear (antialias=True)", lambda e: ipp.eval_image(e, 224, antialias=True)),
      ("eval pil bicubic", lambda e: ipp.eval_image(e, 224, antialias=True,
                                                    interpolation="bicubic")),
      ("eval pil without the window: pil_resize of the whole image, then crop",
       lambda e: full_pil(e)),
      ("eval tf_aa (TF antialiased resize, PIL IDCT)",
       lambda e: ipp.eval_image(e, 224, antialias=True, resizer="tf")),
      ("eval tf_aa_fast (the old antialias=True)",
       lambda e: ipp.eval_image(e, 224, antialias=True, resizer="tf", dct_method="")),
      ("eval tf_fast (antialias=False, PIL IDCT)", lambda e: ipp.eval_image(e, 224)),
      ("eval tf_fast, fast IDCT (the old antialias=False)",
       lambda e: ipp.eval_image(e, 224, dct_method="")),
      ("decode only, PIL IDCT (INTEGER_ACCURATE)",
       lambda e: tf.io.decode_jpeg(e, channels=3, dct_method="INTEGER_ACCURATE")),
      ("decode only, TF default fast IDCT",
       lambda e: tf.io.decode_jpeg(e, channels=3)),
      ("train crop, PIL IDCT (TRAIN_DCT_METHOD)",
       lambda e: ipp.train_image(e, seed, 224, dct_method="INTEGER_ACCURATE")),
      ("train crop, TF default fast IDCT", lambda e: ipp.train_image(e, seed, 224, dct_method="")),
  ]
  print("| what | CPU ms / image | wall ms / image |")
  print("|---|---|---|")
  for label, fn in rows:
    cpu, wall = cpu_per_image(fn, encoded, repeats)
    print(f"| {label} | {cpu * 1e3:.2f} | {wall * 1e3:.2f} |")
  best = None
  for _ in range(repeats):
    cpu, wall = time.process_time(), time.perf_counter()
    for e in encoded:
      torchvision_eval(e, 256, 224, "bilinear")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    best = (cpu, wall) if best is None or cpu < best[0] else best
  print(f"| PIL itself: open, convert, resize bilinear, crop (Python) | "
        f"{best[0] / n * 1e3:.2f} | {best[1] / n * 1e3:.2f} |")


def full_pil(encoded):
  """pil_resize of the whole decoded image, then the crop (what the windowed path avoids)."""
  image = ipp.decode_rgb(encoded)
  shape = tf.shape(image)
  new_h, new_w = ipp.eval_resize_shape(shape[0], shape[1], 256)
  top, left = ipp.eval_crop_offsets(new_h, new_w, 224)
  return ipp.pil_resize(image, (new_h, new_w))[top:top + 224, left:left + 224]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--qualities", default="50,75,95")
  p.add_argument("--quality", type=int, default=90, help="of the timing proxies")
  p.add_argument("--images", type=int, default=128, help="timing proxies")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip-timing", action="store_true")
  args = p.parse_args()
  cases = sample_cases([int(q) for q in args.qualities.split(",")])
  print(f"Pixels vs torchvision + PIL (Pillow {PIL.__version__}), |ours - reference| in grey "
        f"levels over the 224x224x3 crop: max / mean.\n")
  compare_decode(cases)
  print()
  compare(cases, "RGB and grey JPEGs")
  print()
  compare([cmyk_case()], "CMYK (TF converts CMYK to RGB inside the decoder, rounding down where "
          "PIL rounds to nearest: <= 1 level before the resize)")
  if not args.skip_timing:
    timings(args.images, args.quality, args.repeats)


if __name__ == "__main__":
  main()
