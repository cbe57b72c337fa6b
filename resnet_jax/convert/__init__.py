"""Weight conversion: torchvision / timm / Keras files -> our `.safetensors`, and ours ->
a torchvision-layout `.safetensors`.

  python -m resnet_jax.convert import --model resnet50 --from torchvision r50.pth r50.safetensors
  python -m resnet_jax.convert export --model resnet50 r50.safetensors r50_tv.safetensors

From Python:
  variables, info = convert.import_file("resnet50.pth", "resnet50", "torchvision")
  model = models.create(info["model"], num_classes=info["num_classes"])
  logits = model.apply(variables, images)      # images preprocessed as info["preprocessing"]

Layouts: every non-pre-activation model without conv biases (resnet*, resnet*d, seresnet*,
wide_resnet50_2/101_2, resnext*, plain*, the CIFAR nets) has torchvision/timm's layout
(torch_layout.py); the Keras Applications ResNets (resnet*_v1, resnet*_v2) have Keras'
(keras_layout.py). Reading never executes code from the file: safetensors holds none, and
`.pth` files go through `torch.load(weights_only=True)`, which refuses anything but tensors
and plain containers.
"""

import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from resnet_jax import models
from resnet_jax.convert import torch_layout, weights_file

SOURCES = ("torchvision", "timm", "keras")
_TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def layout_of(model_name: str) -> str:
  """"torch", "keras" or "none" (no published layout, e.g. the CIFAR Wide ResNets)."""
  if model_name not in models.MODEL_SPECS:
    raise ValueError(f"unknown model {model_name!r}; see models.list_models()")
  spec = models.MODEL_SPECS[model_name]
  if not models.is_preact(model_name) and not spec.get("conv_bias"):
    return "torch"
  if model_name.endswith(("_v1", "_v2")) and spec.get("stem") == "imagenet":
    return "keras"
  return "none"


def _avg_down(model_name: str) -> bool:
  return models.MODEL_SPECS[model_name]["shortcut"] == "avg_projection"


def _require_layout(model_name: str, layout: str):
  actual = layout_of(model_name)
  if actual == layout:
    return
  if actual == "keras":
    raise ValueError(f"{model_name} has Keras' layout, not torchvision's: use --from keras")
  if layout == "keras":
    raise ValueError(f"{model_name} has no Keras counterpart; Keras models are "
                     "resnet{50,101,152}_v1 and resnet{50,101,152}_v2")
  raise ValueError(f"{model_name} has no torchvision/timm counterpart to convert from or to")


# ---------------------------------------------------------------------------- reading files

def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A flat torch state dict (key -> numpy array) from `.safetensors` or a torch pickle
  (`.pth`, `.pt`, `.bin`, `.ckpt`, `.tar`; needs torch, read with weights_only=True)."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(_TORCH_PICKLE_SUFFIXES):
    return _read_torch_pickle(path)
  raise ValueError(f"{path}: expected a .safetensors or .pth file")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # noqa: PLC0415
  header = weights_file.read_header(path)   # ValueError if not safetensors at all
  if header.get("format") == weights_file.FORMAT:
    raise ValueError(f"{path}: this is a resnet_jax weights file (model "
                     f"{header.get('model')!r}), not a torch state dict: load it with "
                     "convert.weights_file.load, or `export` it")
  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001 -- e.g. bfloat16 tensors, which numpy cannot hold
    raise ValueError(f"{path}: unreadable tensors ({weights_file.first_line(e)})") from None


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise ValueError(f"{path}: reading a .pth file needs torch (pip install torch), or "
                     "save the state dict as .safetensors first") from None
  try:
    # weights_only=True: torch's restricted unpickler, which builds tensors and plain
    # containers only -- a malicious pickle cannot run code through it.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- UnpicklingError, RuntimeError, EOFError...
    raise ValueError(f"{path}: not a plain torch state dict (torch.load with "
                     f"weights_only=True refused it: {weights_file.first_line(e)})") from None
  state = _unwrap_state_dict(path, obj)
  out = {}
  for key, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
      tensor = tensor.float()   # numpy has no bfloat16; our params are float32 anyway
    out[key] = tensor.numpy()
  return out


def _unwrap_state_dict(path: str, obj: Any) -> Mapping[str, Any]:
  """The state dict inside common checkpoint wrappings ({"state_dict": ...}, {"model": ...},
  DataParallel's "module." prefix)."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  for wrapper in ("state_dict", "model"):
    if isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _keras_num_classes(path: str) -> int:
  """The classifier width in a Keras `.weights.h5` / `.keras` file: the shape of its only
  2-D tensor (the Dense kernel; every other ResNet weight is 1-D or 4-D)."""
  import io  # noqa: PLC0415
  import zipfile  # noqa: PLC0415
  import h5py  # noqa: PLC0415  (ships with keras)
  source: Any = path
  if zipfile.is_zipfile(path):   # .keras: a zip with model.weights.h5 inside
    with zipfile.ZipFile(path) as z:
      if "model.weights.h5" not in z.namelist():
        raise ValueError(f"{path}: a zip without model.weights.h5, not a .keras file")
      source = io.BytesIO(z.read("model.weights.h5"))
  kernels = []
  try:
    with h5py.File(source, "r") as f:
      f.visititems(lambda name, obj: kernels.append(obj.shape)
                   if isinstance(obj, h5py.Dataset) and len(obj.shape) == 2 else None)
  except OSError as e:
    raise ValueError(f"{path}: not an HDF5 / Keras weights file ({e})") from None
  if len(kernels) != 1:
    raise ValueError(f"{path}: cannot tell the number of classes ({len(kernels)} 2-D "
                     "tensors); pass --num-classes")
  return int(kernels[0][1])


# ----------------------------------------------------------------------- the two directions

def variables_from_state_dict(state: Mapping[str, np.ndarray], model_name: str,
                              num_classes: int | None = None) -> dict:
  """Our {"params", "batch_stats"} from a torchvision/timm state dict.

  num_classes None: the file's (fc.weight rows; 0 without fc). num_classes=0 with an fc in
  the file imports the backbone alone.
  """
  _require_layout(model_name, "torch")
  file_classes = int(np.shape(state["fc.weight"])[0]) if "fc.weight" in state else 0
  if num_classes is None:
    num_classes = file_classes
  template = weights_file.abstract_variables(model_name, num_classes)
  return torch_layout.from_torch(state, template, avg_down=_avg_down(model_name),
                                 model_name=f"{model_name} ({num_classes} classes)",
                                 drop_head=num_classes == 0)


def torch_state_dict(variables: Mapping[str, Any], model_name: str) -> dict[str, np.ndarray]:
  """Our variables -> the state dict torchvision's (or timm's) model of that name has."""
  if layout_of(model_name) != "torch":
    raise ValueError(f"{model_name} has no torchvision/timm counterpart: only torch-layout "
                     "models (resnet*, resnet*d, seresnet*, resnext*, ...) can be exported")
  weights_file.verify(variables, model_name)
  return torch_layout.to_torch(variables, avg_down=_avg_down(model_name))


def import_file(path: str, model_name: str, source: str, num_classes: int | None = None,
                preprocessing: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
  """(variables, info) from a torchvision / timm / Keras file.

  info: model, num_classes, preprocessing (the source's table, updated by `preprocessing`)
  and source (origin and sha256 of the file) -- what weights_file.save stores.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
  # Model errors before file errors: they are the clearer message.
  _require_layout(model_name, "keras" if source == "keras" else "torch")
  if source == "keras":
    variables, table = _import_keras(path, model_name, num_classes)
  else:
    variables = variables_from_state_dict(read_state_dict(path), model_name, num_classes)
    table = weights_file.preprocessing_for(source, model_name)
  weights_file.verify(variables, model_name)
  info = {"model": model_name, "num_classes": weights_file.num_classes_of(variables),
          "preprocessing": weights_file.check_preprocessing({**table, **(preprocessing or {})}),
          "source": f"{source}:{model_name} {os.path.basename(path)} sha256={_sha256(path)}"}
  return variables, info


def _import_keras(path: str, model_name: str, num_classes: int | None):
  _require_layout(model_name, "keras")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  # Imported on use: Keras conversion is optional, and keras_layout is its own module.
  from resnet_jax.convert import keras_layout  # noqa: PLC0415
  if num_classes is None:
    num_classes = _keras_num_classes(path)
  try:
    variables = keras_layout.load_keras_file(path, model_name, num_classes)
  except ValueError:
    raise
  except Exception as e:  # noqa: BLE001 -- keras reports bad files with many error types
    raise ValueError(f"{path}: Keras could not load it as {model_name}: "
                     f"{weights_file.first_line(e)}") from None
  variables = {c: variables.get(c, {}) for c in weights_file.COLLECTIONS}
  return variables, keras_layout.PREPROCESSING[model_name]


def convert_file(in_path: str, out_path: str, model_name: str, source: str,
                 num_classes: int | None = None,
                 preprocessing: Mapping[str, Any] | None = None) -> dict:
  """import_file, then weights_file.save to `out_path`; returns info."""
  variables, info = import_file(in_path, model_name, source, num_classes, preprocessing)
  weights_file.save(out_path, variables, model_name, info["preprocessing"], info["source"])
  return info


def export_file(in_path: str, out_path: str, model_name: str | None = None) -> dict:
  """Our weights file -> a torchvision-layout `.safetensors` (load it into torchvision with
  `model.load_state_dict(safetensors.torch.load_file(out_path))`). Returns the input's info.
  """
  variables, info = weights_file.load(in_path)
  if model_name is not None and model_name != info["model"]:
    raise ValueError(f"{in_path} holds {info['model']}, not {model_name}")
  state = torch_state_dict(variables, info["model"])
  # "format": "pt" is what torch-side safetensors readers (transformers, timm) look for.
  metadata = {"format": "pt", "model": info["model"], "num_classes": str(info["num_classes"]),
              "preprocessing": json.dumps(info["preprocessing"]),
              "source": f"resnet_jax export of {os.path.basename(in_path)} "
                        f"({info['source']})"}
  weights_file.write_safetensors(out_path, state, metadata)
  return info
