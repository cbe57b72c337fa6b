"""Our converted-weights file: ONE `.safetensors` with everything needed to use the weights.

Tensors: flat keys `params/stage1_block1/conv1/kernel`, `batch_stats/stem_bn/mean`, ... in
our layout (NHWC model, HWIO kernels, float32).
Header metadata (safetensors allows a str -> str dict):
  format         "resnet_jax"
  model          registered name (models.list_models())
  num_classes    "1000" ("0": a headless backbone)
  preprocessing  JSON: image_size, crop_pct, interpolation, channel_order ("RGB"/"BGR"),
                 mean and std in 0..255 units, one value per input channel (3; 1 for a
                 model trained on greyscale images, e.g. digits) -- what the weights expect
                 of their input. Optional "resize": "squash" (resize the whole image to
                 image_size x image_size, as an image folder prepared for cifar-style
                 runs is) instead of the default shorter-side resize and center crop
  class_names    optional, JSON list of num_classes strings (a run's dataset's labels;
                 written by `convert from-run`); files without it read as before
  source         where they came from, e.g. "torchvision:resnet50 resnet50.pth sha256=..."
safetensors holds no code, so reading a file never executes anything.
"""

import json
import os
import stat
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.convert import torch_layout

FORMAT = "resnet_jax"
COLLECTIONS = ("params", "batch_stats")

# ImageNet statistics in 0..255 units (torchvision's 0.485/0.456/0.406 and 0.229/0.224/0.225
# times 255), RGB.
_IMAGENET_MEAN = [123.675, 116.28, 103.53]
_IMAGENET_STD = [58.395, 57.12, 57.375]

# How each source's published weights expect their input. torchvision: resize the shorter
# side to 256, center-crop 224 (crop_pct 224/256), bilinear. timm: its default pretrained tag
# per model (timm 1.0: e.g. resnet50d.ra2_in1k 224 / 0.875 / bicubic, resnet50.a1_in1k
# 224 / 0.95 / bicubic), TIMM_OVERRIDES below. Keras' table is keras_layout.PREPROCESSING.
# Weights with other settings (another timm tag, a fine-tune) override fields on import
# (CLI --preprocessing).
PREPROCESSING = {
    "torchvision": dict(image_size=224, crop_pct=0.875, interpolation="bilinear",
                        channel_order="RGB", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
    "timm": dict(image_size=224, crop_pct=0.875, interpolation="bicubic",
                 channel_order="RGB", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
}
_A1 = dict(crop_pct=0.95)                       # the "ResNet strikes back" a1_in1k tags
_GLUON = dict(image_size=256, crop_pct=0.95)
TIMM_OVERRIDES = {
    "resnet18": _A1, "resnet34": _A1, "resnet50": _A1, "resnet101": _A1, "resnet152": _A1,
    "resnext50_32x4d": _A1, "resnext101_64x4d": _A1, "seresnet50": _A1,
    "resnet101d": _GLUON, "resnet152d": _GLUON, "resnet200d": _GLUON,
    "resnext101_32x8d": dict(interpolation="bilinear"),
    "wide_resnet101_2": dict(interpolation="bilinear"),
}


# torchvision's IMAGENET1K_V2 weights (the new recipe) are evaluated at 224 of 232, not of
# 256: their file names, as torchvision's weight enums list them (torchvision 0.29).
TORCHVISION_V2_FILES = ("resnet50-11ad3fa6", "resnet101-cd907fc2", "resnet152-f82ba261",
                        "wide_resnet50_2-9ba9bcbe", "wide_resnet101_2-d733dc28",
                        "resnext50_32x4d-1a0047aa", "resnext101_32x8d-110c445d",
                        "resnext101_64x4d-173b62eb")
_V2 = dict(crop_pct=224 / 232)


def preprocessing_for(source: str, model_name: str, file_name: str = "") -> dict:
  """The metadata a torchvision / timm checkpoint of `model_name` comes with (`file_name`:
  torchvision's V2 files are known by their names)."""
  table = dict(PREPROCESSING[source])
  if source == "timm":
    table.update(TIMM_OVERRIDES.get(model_name, {}))
  if source == "torchvision" and os.path.basename(file_name).split(".")[0] in TORCHVISION_V2_FILES:
    table.update(_V2)
  return table


PREPROCESSING_KEYS = ("image_size", "crop_pct", "interpolation", "channel_order", "mean", "std")
CHANNELS = (1, 3)                 # input channels a file's model may take: greyscale or colour
RESIZES = ("crop", "squash")      # preprocessing "resize" (optional; default "crop")
_STEM_CONVS = ("stem_conv", "stem_conv1")   # the first conv of each stem (models/resnet.py)


def abstract_variables(model_name: str, num_classes: int, channels: int = 3) -> dict:
  """{"params", "batch_stats"} of jax.ShapeDtypeStruct for a registered model taking
  `channels`-channel images: no compute.

  Parameter shapes do not depend on the input size, so a small input keeps tracing cheap.
  """
  model = models.create(model_name, num_classes=num_classes)
  size = 64 if models.MODEL_SPECS[model_name]["stem"] in ("imagenet", "deep") else 32
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, size, size, channels)))
  return {c: dict(variables.get(c, {})) for c in COLLECTIONS}


def channels_of(variables: Mapping[str, Any]) -> int:
  """The input channels the first (stem) conv's kernel takes; 3 when it has none."""
  params = variables.get("params", {})
  for name in _STEM_CONVS:
    conv = params.get(name)
    if isinstance(conv, Mapping) and len(np.shape(conv.get("kernel"))) == 4:
      return int(np.shape(conv["kernel"])[2])
  return 3


def num_classes_of(variables: Mapping[str, Any]) -> int:
  """The classifier's width, 0 for a headless tree."""
  head = variables.get("params", {}).get("head")
  return int(np.shape(head["kernel"])[-1]) if head else 0


def verify(variables: Mapping[str, Any], model_name: str) -> None:
  """Every leaf of `variables` exists in `model_name` with the same shape, and none is
  missing; ValueError (one line) otherwise."""
  if model_name not in models.MODEL_SPECS:
    raise ValueError(f"unknown model {model_name!r}")
  extra = set(variables) - set(COLLECTIONS)
  if extra:
    raise ValueError(f"unexpected variable collections {sorted(extra)}")
  channels = channels_of(variables)
  if channels not in CHANNELS:
    raise ValueError(f"{model_name}'s stem takes {channels}-channel images; expected "
                     f"{' or '.join(map(str, CHANNELS))}")
  expected = _shapes(abstract_variables(model_name, num_classes_of(variables), channels))
  got = _shapes(variables)
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  mismatched = [f"{k}: got {got[k]}, {model_name} expects {expected[k]}"
                for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
  problems = [f"{kind} {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)"
                                                  if len(items) > 3 else "")
              for kind, items in (("shape mismatch", mismatched), ("missing", missing),
                                  ("unexpected", unexpected)) if items]
  if problems:
    raise ValueError(f"variables do not fit {model_name}: " + "; ".join(problems))


def _shapes(variables: Mapping[str, Any]) -> dict[str, tuple]:
  return {"/".join((c,) + path): tuple(np.shape(x))
          for c in COLLECTIONS
          for path, x in torch_layout.flatten(variables.get(c, {})).items()}


def check_preprocessing(preprocessing: Mapping[str, Any], channels: int | None = None) -> dict:
  """A complete, JSON-able preprocessing dict (ValueError naming the bad field). mean/std
  hold one value per input channel: `channels` of them when given, else 3 or 1."""
  missing = [k for k in PREPROCESSING_KEYS if k not in preprocessing]
  if missing:
    raise ValueError(f"preprocessing lacks {', '.join(missing)}")
  if preprocessing["channel_order"] not in ("RGB", "BGR"):
    raise ValueError(f"preprocessing channel_order={preprocessing['channel_order']!r}; "
                     "expected 'RGB' or 'BGR'")
  if preprocessing.get("resize", "crop") not in RESIZES:
    raise ValueError(f"preprocessing resize={preprocessing['resize']!r}; expected one of "
                     f"{', '.join(map(repr, RESIZES))}")
  for key in ("mean", "std"):
    n = len(preprocessing[key])
    if (channels is not None and n != channels) or n not in CHANNELS:
      expected = (f"{channels} value(s) (the model takes {channels}-channel images)"
                  if channels is not None else "3 values (1 for greyscale models)")
      raise ValueError(f"preprocessing {key} needs {expected}, got {preprocessing[key]!r}")
  return json.loads(json.dumps(dict(preprocessing)))


def check_class_names(class_names, num_classes: int) -> list[str]:
  """`class_names` as a list of num_classes strings (ValueError otherwise)."""
  names = list(class_names)
  if len(names) != num_classes or not all(isinstance(n, str) for n in names):
    raise ValueError(f"class_names must be {num_classes} strings (one per class), got "
                     f"{len(names)} item(s)")
  return names


def save(path: str, variables: Mapping[str, Any], model_name: str,
         preprocessing: Mapping[str, Any], source: str,
         class_names: list[str] | None = None) -> None:
  """Write `variables` ({"params", "batch_stats"}) of `model_name` with their metadata
  (and the classes' names, when given: one per class).

  The shapes are checked against the model first, so a file that saves always loads.
  """
  verify(variables, model_name)
  num_classes = num_classes_of(variables)
  tensors = {"/".join((c,) + p): np.ascontiguousarray(np.asarray(x))
             for c in COLLECTIONS
             for p, x in torch_layout.flatten(variables.get(c, {})).items()}
  metadata = {"format": FORMAT, "model": model_name,
              "num_classes": str(num_classes),
              "preprocessing": json.dumps(check_preprocessing(preprocessing,
                                                              channels_of(variables))),
              "source": source}
  if class_names is not None:
    metadata["class_names"] = json.dumps(check_class_names(class_names, num_classes))
  write_safetensors(path, tensors, metadata)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str]) -> None:
  """safetensors.numpy.save_file, written beside the target and renamed into place so an
  interrupted write never leaves half a file under the final name.

  The file gets the mode of any normally created file (0o666 less the umask: 0644 under
  umask 022, 0640 under 027). safetensors writes through a private temporary file of its
  own (mode 0600) and renames it, so the mode is taken from a file this function creates
  the ordinary way first (which reads the umask without changing it, unlike os.umask)."""
  from safetensors.numpy import save_file  # noqa: PLC0415  (only conversion needs it)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    if os.path.lexists(tmp):          # left by a killed writer with our pid: not ours to reuse
      os.remove(tmp)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    save_file(dict(tensors), tmp, metadata=dict(metadata))
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_header(path: str) -> dict[str, str]:
  """The metadata of any safetensors file ({} if it has none); ValueError if it is not one."""
  from safetensors import safe_open  # noqa: PLC0415
  _check_exists(path)
  try:
    with safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except Exception as e:  # noqa: BLE001 -- safetensors' errors are its own Rust types
    raise ValueError(f"{path}: not a safetensors file ({first_line(e)})") from None


def load(path: str) -> tuple[dict, dict]:
  """(variables, info) from a file written by `save`.

  info: {"model", "num_classes" (int), "preprocessing" (dict), "source"}, and
  "class_names" (list of str) when the file has them.
  ValueError naming the file when it is not one of ours or does not fit its model.
  """
  from safetensors import safe_open  # noqa: PLC0415
  info = read_info(path)
  flat: dict[str, dict] = {c: {} for c in COLLECTIONS}
  with safe_open(path, framework="numpy") as f:
    for key in f.keys():
      collection, _, rest = key.partition("/")
      if collection not in flat or not rest:
        raise ValueError(f"{path}: unexpected tensor {key!r} (expected params/... or "
                         "batch_stats/...)")
      flat[collection][tuple(rest.split("/"))] = f.get_tensor(key)
  variables = {c: torch_layout.unflatten(leaves) for c, leaves in flat.items()}
  try:
    verify(variables, info["model"])
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  if num_classes_of(variables) != info["num_classes"]:
    raise ValueError(f"{path}: header says num_classes={info['num_classes']}, the head has "
                     f"{num_classes_of(variables)}")
  return variables, info


def read_info(path: str) -> dict:
  """`load`'s info from the header alone (no tensor is read); ValueError naming the file
  when it is not one of ours."""
  header = read_header(path)
  if header.get("format") != FORMAT:
    raise ValueError(f"{path}: not a resnet_jax weights file (format "
                     f"{header.get('format')!r}); convert it with "
                     "`python -m resnet_jax.convert import`")
  return _parse_info(path, header)


def _parse_info(path: str, header: Mapping[str, str]) -> dict:
  model = header.get("model")
  if model not in models.MODEL_SPECS:
    raise ValueError(f"{path}: unknown model {model!r} in the header")
  try:
    num_classes = int(header.get("num_classes", ""))
    preprocessing = json.loads(header.get("preprocessing", ""))
    class_names = json.loads(header["class_names"]) if "class_names" in header else None
  except ValueError as e:
    raise ValueError(f"{path}: unreadable header field ({first_line(e)})") from None
  info = {"model": model, "num_classes": num_classes, "preprocessing": preprocessing,
          "source": header.get("source", "")}
  if class_names is not None:
    try:
      info["class_names"] = check_class_names(class_names, num_classes)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: header field class_names: {first_line(e)}") from None
  return info


def _check_exists(path: str):
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")


def first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
