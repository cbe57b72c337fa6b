"""The reference that eval preprocessing is held to, in PIL alone: torchvision's (and timm's)
eval transform, and JPEG files made as PIL makes them. Shared by tests/test_pixel_exact.py
and experiments/eval_preprocess_vs_pil.py, so the test and the measurement check the same
thing."""

import io

import numpy as np
from PIL import Image

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def torchvision_eval(encoded: bytes, resize: int, crop: int, interpolation: str):
  """torchvision's Resize(resize) + CenterCrop(crop) on Image.open(...).convert("RGB"), as
  uint8: shorter side to `resize`, longer side int(resize * long / short), the crop at
  int(round((new - crop) / 2.0))."""
  image = Image.open(io.BytesIO(encoded)).convert("RGB")
  w, h = image.size
  if w <= h:
    new_w, new_h = resize, int(resize * h / w)
  else:
    new_w, new_h = int(resize * w / h), resize
  image = image.resize((new_w, new_h), PIL_FILTERS[interpolation])
  top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
  return np.asarray(image.crop((left, top, left + crop, top + crop)))


def jpeg(array, quality, mode="RGB", **kw) -> bytes:
  """`array` as a JPEG file written by PIL (`kw`: subsampling, progressive, ...)."""
  out = io.BytesIO()
  Image.fromarray(array).convert(mode).save(out, format="JPEG", quality=quality, **kw)
  return out.getvalue()
