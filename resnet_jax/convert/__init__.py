"""Weight conversion: torchvision / timm / Keras files -> our `.safetensors`, ours ->
a torchvision-layout `.safetensors`, and a training run's checkpoint -> our `.safetensors`.

  python -m resnet_jax.convert import --model resnet50 --from torchvision r50.pth r50.safetensors
  python -m resnet_jax.convert export --model resnet50 r50.safetensors r50_tv.safetensors
  python -m resnet_jax.convert from-run experiments/runs/digits_resnet20 digits.safetensors

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
from resnet_jax.convert import torch_layout, torch_pickle, weights_file

SOURCES = ("torchvision", "timm", "keras")


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
  if path.endswith(torch_pickle.SUFFIXES):
    return torch_pickle.read(path)
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
    table = weights_file.preprocessing_for(source, model_name, path)
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
  if info.get("class_names") is not None:
    metadata["class_names"] = json.dumps(info["class_names"])
  weights_file.write_safetensors(out_path, state, metadata)
  return info


# ------------------------------------------------------------------ a training run's weights
#
# Read-only: the run's checkpoints are opened with a read-only Orbax manager (no folder
# created, no temporary folder of a save in progress cleaned up, nothing moved aside), so a
# run may be converted or evaluated while it still trains.

_CHECKPOINT_DIRS = {False: "checkpoints", True: "checkpoints_best"}


def _read_only_manager(directory: str):
  import orbax.checkpoint as ocp  # noqa: PLC0415
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                         save_interval_steps=0)
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def run_checkpoint_steps(workdir: str, *, best: bool = False) -> list[int]:
  """The complete saves in WORKDIR/checkpoints (best: checkpoints_best), oldest first."""
  directory = os.path.join(workdir, _CHECKPOINT_DIRS[best])
  if not os.path.isdir(directory):
    return []
  manager = _read_only_manager(directory)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def add_run_checkpoint_arguments(parser) -> None:
  """--step N | --best and --ema: which checkpoint of a run a command reads (convert
  from-run, evaluate)."""
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, metavar="N",
                     help="the save of step N in WORKDIR/checkpoints (default: the latest)")
  which.add_argument("--best", action="store_true",
                     help="the best save (WORKDIR/checkpoints_best, by checkpoint.best_metric)")
  parser.add_argument("--ema", action="store_true",
                      help="the EMA of the weights (runs with optimizer.ema_decay > 0)")


def select_run_checkpoint(workdir: str, *, step: int | None = None,
                          best: bool = False) -> tuple[str, int]:
  """(checkpoint directory, step) of a run: its latest save, save `step`, or (best) its best
  one. ValueError (one line) for a workdir without checkpoints or without that step."""
  if not os.path.isdir(workdir):
    raise ValueError(f"{workdir}: no such directory (expected a training run's workdir)")
  directory = os.path.join(os.path.abspath(workdir), _CHECKPOINT_DIRS[best])
  steps = run_checkpoint_steps(workdir, best=best)
  if not steps:
    if best:
      raise ValueError(f"{workdir}: no best checkpoint in {_CHECKPOINT_DIRS[True]}/ (kept "
                       "at evaluations when checkpoint.best_metric is set); use the latest "
                       "(no --best) or --step N")
    raise ValueError(f"{workdir}: no checkpoints in {_CHECKPOINT_DIRS[False]}/ (not a "
                     "training run's workdir, or it has saved nothing yet)")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    held = ", ".join(map(str, steps))
    raise ValueError(f"{workdir}: no checkpoint at step {step} in "
                     f"{_CHECKPOINT_DIRS[best]}/ (it holds step(s) {held})")
  return directory, step


def read_run_checkpoint(directory: str, step: int, target=None) -> tuple[Any, dict]:
  """(state, meta) of save `step` in `directory`, read-only, its arrays checked against the
  checksums saved with them. `target`: the abstract state (with shardings) to restore into;
  None: the saved tree as nested dicts on this process's first device. ValueError (one
  line) for a save that does not read or does not match its checksums."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from resnet_jax.training import checkpoints  # noqa: PLC0415
  where = f"checkpoint {directory}/{step}"
  manager = _read_only_manager(directory)
  try:
    if target is None:
      saved = manager.item_metadata(step)["state"]
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 -- any read failure: one line naming the save
    raise ValueError(f"{where} is unreadable "
                     f"({checkpoints.failure_reason(e, os.path.dirname(directory))})") from None
  finally:
    manager.close()
  try:
    checkpoints.verify_checksums(restored["state"], restored["meta"])
  except checkpoints.ChecksumMismatch as e:
    raise ValueError(f"{where}: {e}") from None
  return restored["state"], restored["meta"]


def _get(tree, name):
  return tree.get(name) if isinstance(tree, Mapping) else getattr(tree, name, None)


def run_has_ema(state) -> bool:
  """Whether a restored state carries EMA weights (optimizer.ema_decay > 0 in its run)."""
  return bool(_get(state, "ema_params"))


def run_variables(state, *, ema: bool = False) -> dict:
  """{"params", "batch_stats"} of a restored run state: the raw weights or their EMA, as
  host numpy arrays."""
  import jax  # noqa: PLC0415
  names = ("ema_params", "ema_batch_stats") if ema else ("params", "batch_stats")
  return {c: jax.tree.map(np.asarray, jax.device_get(dict(_get(state, n) or {})))
          for c, n in zip(weights_file.COLLECTIONS, names)}


def run_preprocessing(config, image_shape) -> dict:
  """What the run's evaluation feeds its model, as the weights file records it: the eval
  crop (data.eval_image_size or data.image_size for data.preprocess "imagenet", else the
  dataset's image size), crop_pct, interpolation, channel order and mean/std
  (catalog.normalization: the config's, else the dataset's)."""
  from resnet_jax.data import catalog  # noqa: PLC0415
  data = config.data
  mean, std = catalog.normalization(data)
  table = {"channel_order": data.channel_order, "mean": [float(v) for v in mean],
           "std": [float(v) for v in std]}
  if data.preprocess == "imagenet":
    table.update(image_size=int(data.eval_image_size or data.image_size),
                 crop_pct=float(data.crop_pct), interpolation=data.interpolation)
  else:
    # cifar-style: the stored images as they are (an image folder's resized whole, not
    # cropped, to data.image_size when it was prepared).
    table.update(image_size=int(image_shape[0]), crop_pct=1.0, interpolation="bilinear")
    if data.dataset == "image_folder":
      table["resize"] = "squash"
  return table


def dataset_labels(config) -> tuple[list[str] | None, tuple[int, ...], str]:
  """(class names or None, stored image shape, why there are no names) of the run's
  dataset, from its TFDS builder's info, read without preparing anything (no download,
  nothing written):
  - a prepared dataset (the run's data_dir as it trained): the label names it recorded
    (digits "0".."9"; cifar10 "airplane", ...; imagenet2012 WordNet ids);
  - an image folder: its class folders' names, prepared or not;
  - another dataset not prepared in data_dir: the names its builder defines in code
    (imagenet2012: TFDS's ILSVRC2012 label file), None where those are only the indices
    (cifar10's names come with its download).
  Raises when the builder cannot be made (e.g. the image folder is gone)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  from resnet_jax.data import datasets, image_folder  # noqa: PLC0415
  data = config.data
  data_dir = datasets.resolve_data_dir(data.data_dir)
  if data.dataset == "image_folder":
    root = os.path.expanduser(data.image_folder)
    if not os.path.isdir(root):
      raise ValueError(f"data.image_folder {data.image_folder!r} is not a directory")
    builder = image_folder.ImageFolder(root_dir=root, image_size=data.image_size,
                                       corrupt=data.corrupt_images, data_dir=data_dir,
                                       keep_encoded=data.preprocess == "imagenet")
  else:
    builder = tfds.builder(datasets.DATASETS[data.dataset].tfds_name, data_dir=data_dir)
  features = builder.info.features
  names, shape = list(features["label"].names), tuple(features["image"].shape)
  if (data.dataset != "image_folder" and not builder.is_prepared()
      and names == [str(i) for i in range(len(names))]):
    return None, shape, f"not prepared in {data_dir}"
  return names, shape, ""


def weights_from_run(workdir: str, *, step: int | None = None, best: bool = False,
                     ema: bool = False) -> tuple[dict, dict, list[str]]:
  """(variables, info, notes) of a run's checkpoint (latest, `step` or best; raw or EMA):
  what `from_run_file` writes. info as weights_file.load's, with class_names; notes: lines
  worth saying (class names that could not be read, model settings the file cannot hold).
  ValueError (one line) for a workdir without checkpoints, a missing step, --ema on a run
  without EMA, a run whose model the file cannot describe."""
  from resnet_jax import config_cli  # noqa: PLC0415
  directory, step = select_run_checkpoint(workdir, step=step, best=best)
  config = config_cli.load_recorded(workdir)
  if ema and config.optimizer.ema_decay <= 0:
    raise ValueError(f"{workdir}: --ema, but the run kept no EMA of its weights "
                     f"(optimizer.ema_decay={config.optimizer.ema_decay})")
  state, meta = read_run_checkpoint(directory, step)
  if ema and not run_has_ema(state):
    raise ValueError(f"{workdir}: --ema, but checkpoint {directory}/{step} holds no EMA "
                     "weights")
  model_name = config.model.name
  if meta.get("model", model_name) != model_name:
    raise ValueError(f"checkpoint {directory}/{step} holds {meta['model']}, the run's "
                     f"config.json says model.name={model_name!r}")
  variables = run_variables(state, ema=ema)
  try:
    weights_file.verify(variables, model_name)
  except ValueError as e:
    raise ValueError(f"{workdir}: the run's model does not fit the registered "
                     f"{model_name} a weights file names ({e})") from None
  num_classes = weights_file.num_classes_of(variables)
  notes = []
  if config.model.bn_epsilon > 0:
    notes.append(f"the run's model.bn_epsilon={config.model.bn_epsilon} is not recorded in "
                 f"the file: {model_name} is rebuilt with its own BatchNorm epsilon")
  image_shape = None
  try:
    names, image_shape, why = dataset_labels(config)
    if names is not None and len(names) != num_classes:
      names, why = None, f"{len(names)} labels for a {num_classes}-class head"
  except Exception as e:  # noqa: BLE001 -- any reason the dataset's info cannot be read
    names, why = None, weights_file.first_line(e)
  if names is None:
    names = [str(i) for i in range(num_classes)]
    notes.append(f"class names of {config.data.dataset} not available ({why}); stored "
                 f"0..{num_classes - 1}")
  if config.data.preprocess != "imagenet" and not image_shape:
    if config.data.image_size <= 0:
      raise ValueError(f"{workdir}: cannot tell the image size the run's model takes "
                       f"({config.data.dataset}'s info is not available)")
    image_shape = (config.data.image_size,) * 2
  preprocessing = run_preprocessing(config, image_shape)
  if len(preprocessing["mean"]) != weights_file.channels_of(variables):
    raise ValueError(f"{workdir}: mean/std {preprocessing['mean']}/{preprocessing['std']} do "
                     f"not fit the model's {weights_file.channels_of(variables)}-channel "
                     "input")
  kind = "ema" if ema else "raw"
  source = (f"resnet_jax run {os.path.abspath(workdir)} {_CHECKPOINT_DIRS[best]}/{step} "
            f"({kind} weights; {config.data.dataset})")
  info = {"model": model_name, "num_classes": num_classes,
          "preprocessing": weights_file.check_preprocessing(
              preprocessing, weights_file.channels_of(variables)),
          "source": source, "class_names": names, "step": step}
  return variables, info, notes


def from_run_file(workdir: str, out_path: str, *, step: int | None = None,
                  best: bool = False, ema: bool = False) -> tuple[dict, list[str]]:
  """weights_from_run, then weights_file.save to `out_path`; returns (info, notes)."""
  variables, info, notes = weights_from_run(workdir, step=step, best=best, ema=ema)
  weights_file.save(out_path, variables, info["model"], info["preprocessing"],
                    info["source"], class_names=info["class_names"])
  return info, notes
