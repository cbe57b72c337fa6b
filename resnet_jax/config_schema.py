"""Every config key, its type and its neutral default; and the checks run before training.

Experiment files in `configs/` start from `base_config()` and set what the experiment is
about. Anything they add that is not declared here is a typo and is reported as such,
whether it came from the file or from a `--config.key=value` override.
"""

import dataclasses
import difflib
import math
import os
from typing import Any

import ml_collections

from resnet_jax.errors import ConfigError


DATA_ROOT_DEFAULT = "~/resnet_jax_data"


def data_root() -> str:
  """Where configs find dataset files that TFDS cannot download for them (e.g. the JPEG
  copy of CIFAR-10): $RESNET_JAX_DATA, default ~/resnet_jax_data."""
  return os.path.expanduser(os.environ.get("RESNET_JAX_DATA") or DATA_ROOT_DEFAULT)


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: its default (which also fixes its type), what it means, its allowed
  values if they are a fixed set, and whether changing it changes the run (a resumed run
  refuses a change of such a key; see `changed_run_keys`)."""
  name: str
  default: Any
  meaning: str
  choices: tuple = ()
  changes_run: bool = True
  element: type | None = None     # a tuple's element type, where the default is empty


# Every key. Keys with changes_run=False only say where files are, how often to log, eval
# or save, how fast to compute, or when to stop: resuming with another value continues the
# same run.
KEYS = (
    Key("seed", 0, "random seed: initialisation, data order, augmentation, dropout"),
    Key("lowering", "auto", "how layers run (resnet_jax/lowering.py): auto, native, or the "
        "CPU backend's onednn / cpu; the same numbers to float32 rounding, other speed",
        ("auto", "native", "onednn", "cpu"), changes_run=False),
    Key("model.name", "resnet20", "a registered model (python -m resnet_jax.models --names)"),
    Key("model.dtype", "float32", "compute dtype; params and BatchNorm statistics stay fp32",
        ("float32", "bfloat16", "float16")),
    Key("model.zero_init_last_bn", False, "each block's last BN scale (v2: last conv) starts "
        "at zero, so every block starts as the identity"),
    Key("model.bn_momentum", 0.9, "BatchNorm running-average momentum"),
    Key("model.bn_epsilon", 0.0, "BatchNorm epsilon; 0 = the named model's (1e-5; Keras-layout "
        "v1/v2: 1.001e-5)"),
    Key("model.se_ratio", -1.0, "squeeze-excitation ratio in every block; -1 = as the named "
        "model"),
    Key("model.drop_path_rate", 0.0, "stochastic depth at the last block, rising linearly "
        "from 0 at the first"),
    Key("model.bn_group_size", 0, "0: BatchNorm over the global batch; G: ghost BatchNorm "
        "over groups of G examples"),
    Key("model.frozen", (), "parts that do not train: 'stem', 'stage1'..'stageN', 'final', "
        "'head', or 'body' (all but the head); their params get no update and their "
        "BatchNorm runs in inference mode (statistics kept)", element=str),
    Key("model.unfreeze_step", 0, "> 0: the frozen parts train too from this step on (two "
        "phases: head first, then everything)"),
    Key("model.pretrained", "", "a resnet_jax .safetensors a fresh run starts from (the "
        "head afresh if the class count differs); its mean/std/channel_order fill data keys "
        "left at default. A resumed run continues from its own checkpoint",
        changes_run=False),
    Key("data.dataset", "sklearn_digits", "a dataset of resnet_jax/data/catalog.py"),
    Key("data.data_dir", "", "where TFDS keeps prepared datasets; '' = $TFDS_DATA_DIR or "
        "~/tensorflow_datasets", changes_run=False),
    Key("data.manual_dir", "", "a folder of the dataset's files to prepare from instead of "
        "downloading (ImageNet: the official tars)", changes_run=False),
    Key("data.image_folder", "", "dataset image_folder: <root>/<split>/<class>/<image> (or "
        "<root>/<split>.tar)", changes_run=False),
    Key("data.image_size", 0, "image_folder: resize to this square size; preprocess imagenet: "
        "the crop size"),
    Key("data.corrupt_images", "skip", "image_folder: a file that does not decode is skipped "
        "(and listed) or stops preparation", ("skip", "error")),
    Key("data.mean", (0.0,), "per-channel mean in 0..255 units; (0.0,) = the dataset's"),
    Key("data.std", (0.0,), "per-channel std in 0..255 units; (0.0,) = the dataset's"),
    Key("data.train_split", "train", "the TFDS split trained on"),
    Key("data.eval_split", "test", "the TFDS split evaluated on", changes_run=False),
    Key("data.batch_size", 128, "global batch, over all devices and processes"),
    Key("data.eval_batch_size", 0, "global eval batch; 0 = batch_size", changes_run=False),
    Key("data.process_sharding", "batch", "batch: each process reads the split and keeps its "
        "slice of every global batch (batches independent of the process count); split: each "
        "reads 1/n (ImageNet)", ("batch", "split")),
    Key("data.shuffle_buffer", 0, "examples in the shuffle buffer; 0 = the whole "
        "(per-process) train split"),
    Key("data.cache", True, "keep decoded examples in memory (small datasets)",
        changes_run=False),
    Key("data.prefetch", 2, "batches prepared ahead on the host", changes_run=False),
    Key("data.crop_padding", 0, "train: pad by this many pixels, then random-crop back"),
    Key("data.random_flip", False, "train: random left-right flip"),
    Key("data.preprocess", "cifar", "cifar: fixed-size decoded images, optional pad-crop and "
        "flip; imagenet: images stay encoded, train random-resized crop + flip, eval resize + "
        "center crop", ("cifar", "imagenet")),
    Key("data.crop_pct", 0.875, "imagenet eval: the center crop of the image resized to "
        "eval size / crop_pct (224 of 256; torchvision's V2 weights: 224 of 232 = 0.965)",
        changes_run=False),
    Key("data.eval_image_size", 0, "imagenet eval: the crop size when it differs from the "
        "train crop (train/test resolution, e.g. 160 / 224); 0 = image_size",
        changes_run=False),
    Key("data.interpolation", "bilinear", "imagenet eval resize: bilinear (torchvision) or "
        "bicubic (timm)", ("bilinear", "bicubic"), changes_run=False),
    Key("data.randaugment_ops", 0, "train: RandAugment with this many ops per image (0 = off)"),
    Key("data.randaugment_magnitude", 9.0, "train: RandAugment magnitude on the paper's "
        "0..10 scale (torchvision's RandAugment(magnitude=M, num_magnitude_bins=11))"),
    Key("data.trivial_augment", False, "train: TrivialAugment (one op, random magnitude)"),
    Key("data.random_erasing", 0.0, "train: probability of erasing a random rectangle "
        "(filled with per-pixel normal noise in normalised units, timm's 'pixel' mode)"),
    Key("data.mixup_alpha", 0.0, "train: mixup with Beta(alpha, alpha) weights (0 = off); "
        "on the device, per global batch, the partner being the batch reversed (the same "
        "for any process count with process_sharding=batch)"),
    Key("data.cutmix_alpha", 0.0, "train: cutmix with Beta(alpha, alpha) areas (0 = off); "
        "with mixup too, one of the two per batch"),
    Key("data.antialias", False, "imagenet: antialiased resizes (True: as torchvision with "
        "PIL; False: TF's reference recipe, faster)"),
    Key("data.channel_order", "RGB", "RGB, or BGR for Caffe-style weights; data.mean/std are "
        "in this order", ("RGB", "BGR")),
    Key("optimizer.name", "sgd", "sgd (momentum, Nesterov), lars (MLPerf), lamb or adamw",
        ("sgd", "lars", "lamb", "adamw")),
    Key("optimizer.learning_rate", 0.1, "peak learning rate"),
    Key("optimizer.momentum", 0.9, "SGD and LARS momentum"),
    Key("optimizer.nesterov", False, "Nesterov momentum (sgd, lars)"),
    Key("optimizer.beta1", 0.9, "lamb / adamw: first-moment decay"),
    Key("optimizer.beta2", 0.999, "lamb / adamw: second-moment decay"),
    Key("optimizer.epsilon", 1e-8, "lamb / adamw: added to the second moment's root"),
    Key("optimizer.trust_coefficient", 0.001, "lars: the trust ratio's coefficient (eta)"),
    Key("optimizer.weight_decay", 1e-4, "on conv/dense kernels only (not BN, not biases): "
        "L2 added to the gradient for sgd and lars, decoupled for lamb and adamw"),
    Key("optimizer.lr_multipliers", (), "per-part learning-rate factors, e.g. ('head=10',); "
        "parts as model.frozen", element=str),
    Key("optimizer.label_smoothing", 0.0, "label smoothing of the targets"),
    Key("optimizer.loss", "softmax", "softmax cross-entropy, or bce: sigmoid binary "
        "cross-entropy summed over classes (ResNet strikes back; timm's sum_classes=True); "
        "eval loss stays softmax cross-entropy", ("softmax", "bce")),
    Key("optimizer.bce_target_threshold", 0.0, "bce: targets below this become 0 (timm's "
        "target_threshold; ResNet strikes back: 0.2); 0 = off"),
    Key("optimizer.grad_accum_steps", 1, "K: each step averages the gradients of K "
        "micro-batches of batch_size / K"),
    Key("optimizer.ema_decay", 0.0, "> 0: keep an exponential moving average of params and "
        "BN statistics, and evaluate it too"),
    Key("schedule.name", "cosine", "learning-rate schedule after the warm-up",
        ("cosine", "step", "constant", "poly")),
    Key("schedule.poly_power", 2.0, "poly: lr = peak x (1 - progress)^power (MLPerf: 2)"),
    Key("schedule.end_learning_rate", 0.0, "cosine and poly: the rate at the last step"),
    Key("schedule.warmup_epochs", 0.0, "warm-up length in epochs"),
    Key("schedule.warmup_steps", 0, "> 0: warm-up length in steps (over warmup_epochs)"),
    Key("schedule.warmup_shape", "linear", "linear: from 0 to the peak; constant: "
        "warmup_factor x the peak", ("linear", "constant")),
    Key("schedule.warmup_factor", 0.1, "constant warm-up: this fraction of the peak"),
    Key("schedule.decay_epochs", (0.0,), "step schedule: epochs at which the rate is "
        "multiplied by decay_factor"),
    Key("schedule.decay_steps", (0,), "step schedule: the same in steps (over decay_epochs "
        "when set)"),
    Key("schedule.decay_factor", 0.1, "step schedule: the factor at each decay"),
    Key("num_epochs", 1.0, "training length in epochs"),
    Key("num_train_steps", -1, "> 0: training length in steps (over num_epochs)"),
    Key("stop_after_steps", -1, "> 0: save and stop at this step (a planned break; run "
        "without it, or with a larger value, to continue)", changes_run=False),
    Key("eval_only", False, "evaluate the starting state (the workdir's latest checkpoint, "
        "or model.pretrained) and stop: nothing trained or saved", changes_run=False),
    Key("eval_every_epochs", 1.0, "evaluate every this many epochs (and at the end)",
        changes_run=False),
    Key("eval_every_steps", -1, "> 0: evaluate every this many steps (over "
        "eval_every_epochs)", changes_run=False),
    Key("log_every_steps", 50, "train metrics every this many steps: means over the steps "
        "since the previous line", changes_run=False),
    Key("log_grad_norms", "none", "also log each stage's (or block's) gradient norm",
        ("none", "stage", "block"), changes_run=False),
    Key("nan_policy", "stop", "non-finite loss, gradients or params: stop (exit 3), or skip "
        "the update and count it", ("stop", "skip")),
    Key("checkpoint.every_steps", 500, "save every this many steps (and at the end)",
        changes_run=False),
    Key("checkpoint.keep", 3, "saves kept (the newest)", changes_run=False),
    Key("checkpoint.async_save", True, "write checkpoints in the background",
        changes_run=False),
    Key("checkpoint.best_metric", "top1", "also keep the best save by this eval metric; "
        "'' = off", ("", "top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"),
        changes_run=False),
    Key("checkpoint.best_mode", "max", "whether the best metric is the largest or smallest",
        ("max", "min"), changes_run=False),
    Key("mesh.data", -1, "devices on the data axis; -1 = all / mesh.fsdp", changes_run=False),
    Key("mesh.fsdp", 1, "> 1: split params and optimizer state over this many devices",
        changes_run=False),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}
MAX_STEPS = 2**31 - 1      # TrainState.step is int32
_CHOICES = {k.name: k.choices for k in KEYS if k.choices}


def base_config() -> ml_collections.ConfigDict:
  """Every key at its neutral default: what an experiment file starts from."""
  c = ml_collections.ConfigDict()
  for key in KEYS:
    *sections, leaf = key.name.split(".")
    node = c
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[leaf] = key.default
  return c


def type_name(default) -> str:
  if isinstance(default, tuple):
    return f"tuple of {type(default[0]).__name__}" if default else "tuple"
  return type(default).__name__


def describe_keys(pattern: str = "") -> list[str]:
  """Every key whose name contains `pattern`: name, type, default, choices and meaning."""
  lines = []
  for key in KEYS:
    if pattern in key.name:
      choices = f" (one of {', '.join(map(repr, key.choices))})" if key.choices else ""
      lines.append(f"{key.name}  [{type_name(key.default)}, default {key.default!r}]"
                   f"{choices}\n    {key.meaning}")
  return lines


def changed_run_keys(recorded, config) -> list[tuple[str, Any, Any]]:
  """[(key, recorded value, new value)] for the keys that change the run and differ.
  `recorded` may be the JSON form (a checkpoint's meta); a key it lacks (recorded by an
  older version) counts as its default."""
  def flat(c):
    return _flatten_plain(c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c)
  old, new = flat(recorded), flat(config)
  changed = []
  for key in KEYS:
    if not key.changes_run:
      continue
    a, b = old.get(key.name, key.default), new.get(key.name, key.default)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
      same = tuple(a) == tuple(b)
    else:
      same = a == b
    if not same:
      changed.append((key.name, a, b))
  return changed


def _flatten_plain(values: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(_flatten_plain(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _get(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def _flatten(cfg, prefix=""):
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _type_name(value):
  return type(value).__name__


def _same_type(default, value) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(default, bool) and isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def suggest(key: str, known) -> str:
  """' (did you mean 'x'?)' for the likeliest intended key, or ''."""
  known = list(known)
  section, _, leaf = key.rpartition(".")
  # Abbreviations first: 'lr' -> 'learning_rate', 'bs' -> 'batch_size' (same section).
  for candidate in known:
    c_section, _, c_leaf = candidate.rpartition(".")
    if c_section == section and "_" in c_leaf and leaf == "".join(
        w[0] for w in c_leaf.split("_")):
      return f" (did you mean '{candidate}'?)"
  close = difflib.get_close_matches(key, known, n=1)
  return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  """Unknown keys and wrong types, against `base_config()`."""
  schema = _flatten(base_config())
  for key, value in _flatten(config).items():
    if key not in schema:
      raise ConfigError(f"unknown config key '{key}'{suggest(key, schema)}")
    if not _same_type(schema[key], value):
      raise ConfigError(f"config key '{key}' must be {_type_name(schema[key])}, "
                        f"got {_type_name(value)} {value!r}")


def check_values(config, *, num_devices: int, num_processes: int) -> None:
  """Values that cannot work: raise ConfigError naming the key and what was expected."""
  from resnet_jax import models
  from resnet_jax.data import catalog

  def need(ok, key, expected):
    if not ok:
      raise ConfigError(f"config key '{key}'={_get(config, key)!r}: expected {expected}")

  for key, value in _flatten(config).items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    need(all(math.isfinite(v) for v in values if isinstance(v, float)), key,
         "a finite number")
  for key, choices in _CHOICES.items():
    need(_get(config, key) in choices, key, f"one of {', '.join(map(repr, choices))}")
  # The seed seeds JAX's PRNG and tf.data's stateless ops, both 32-bit.
  need(0 <= config.seed < 2**31, "seed", "an int in [0, 2^31)")
  need(config.num_train_steps < MAX_STEPS, "num_train_steps",
       "fewer than 2^31 steps (the step counter is int32)")
  need(config.stop_after_steps < MAX_STEPS, "stop_after_steps", "fewer than 2^31 steps")
  need(config.model.name in models.MODEL_SPECS, "model.name",
       f"a model name{suggest(config.model.name, models.MODEL_SPECS)}; "
       "see resnet_jax.models.list_models()")
  need(config.data.dataset in catalog.DATASETS, "data.dataset",
       f"one of {', '.join(sorted(catalog.DATASETS))}")

  need(config.mesh.fsdp >= 1 and num_devices % config.mesh.fsdp == 0, "mesh.fsdp",
       f"a divisor of the device count ({num_devices})")
  mesh_data = num_devices // config.mesh.fsdp
  need(config.mesh.data in (-1, mesh_data), "mesh.data",
       f"-1 or devices / mesh.fsdp ({mesh_data})")
  for key in ("data.batch_size", "data.eval_batch_size"):
    batch = _get(config, key)
    if key == "data.eval_batch_size" and batch == 0:
      continue
    need(batch > 0, key, "a positive batch size")
    need(batch % num_devices == 0, key,
         f"a multiple of the device count ({num_devices}), since the global batch is split "
         "evenly over the data axis")
    need(batch % num_processes == 0, key, f"a multiple of the process count ({num_processes})")

  need(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs",
       "> 0 (or num_train_steps > 0)")
  need(config.optimizer.learning_rate >= 0, "optimizer.learning_rate", ">= 0")
  need(0 <= config.optimizer.momentum < 1, "optimizer.momentum", "in [0, 1)")
  need(config.optimizer.weight_decay >= 0, "optimizer.weight_decay", ">= 0")
  need(0 <= config.optimizer.label_smoothing < 1, "optimizer.label_smoothing", "in [0, 1)")
  need(config.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", ">= 0")
  need(config.schedule.warmup_steps >= 0, "schedule.warmup_steps", ">= 0")
  need(0 < config.schedule.warmup_factor <= 1, "schedule.warmup_factor", "in (0, 1]")
  need(list(config.schedule.decay_steps) == sorted(config.schedule.decay_steps),
       "schedule.decay_steps", "increasing steps")
  need(0 < config.schedule.decay_factor <= 1, "schedule.decay_factor", "in (0, 1]")
  need(list(config.schedule.decay_epochs) == sorted(config.schedule.decay_epochs),
       "schedule.decay_epochs", "increasing epochs")
  need(0 < config.model.bn_momentum < 1, "model.bn_momentum", "in (0, 1)")
  need(config.model.bn_epsilon >= 0, "model.bn_epsilon", ">= 0 (0: the named model's own)")
  need(config.model.se_ratio == -1 or 0 <= config.model.se_ratio <= 1, "model.se_ratio",
       "-1 (as the named model) or in [0, 1]")
  need(0 <= config.model.drop_path_rate < 1, "model.drop_path_rate", "in [0, 1)")
  need(config.optimizer.grad_accum_steps >= 1, "optimizer.grad_accum_steps", ">= 1")
  micro = config.data.batch_size // config.optimizer.grad_accum_steps
  need(config.data.batch_size % config.optimizer.grad_accum_steps == 0 and
       micro % num_devices == 0, "optimizer.grad_accum_steps",
       f"a divisor of data.batch_size whose micro-batch ({micro}) is a multiple of the "
       f"device count ({num_devices})")
  need(0 <= config.optimizer.ema_decay < 1, "optimizer.ema_decay", "in [0, 1)")
  need(0 <= config.optimizer.beta1 < 1, "optimizer.beta1", "in [0, 1)")
  need(0 <= config.optimizer.beta2 < 1, "optimizer.beta2", "in [0, 1)")
  need(config.optimizer.epsilon >= 0, "optimizer.epsilon", ">= 0")
  need(config.optimizer.trust_coefficient > 0, "optimizer.trust_coefficient", "> 0")
  for entry in config.optimizer.lr_multipliers:
    part, sep, factor = entry.partition("=")
    try:
      ok = bool(sep and part.strip()) and float(factor) >= 0 and math.isfinite(float(factor))
    except ValueError:
      ok = False
    need(ok, "optimizer.lr_multipliers", "entries PART=FACTOR with a factor >= 0, e.g. "
         "'head=10'")
  need(config.model.unfreeze_step >= 0, "model.unfreeze_step", ">= 0")
  need(config.model.unfreeze_step == 0 or config.model.frozen, "model.unfreeze_step",
       "0 without model.frozen (nothing to unfreeze)")
  need(config.schedule.poly_power > 0, "schedule.poly_power", "> 0")
  need(0 <= config.schedule.end_learning_rate <= config.optimizer.learning_rate,
       "schedule.end_learning_rate", "in [0, optimizer.learning_rate]")
  data = config.data
  need(data.randaugment_ops >= 0, "data.randaugment_ops", ">= 0")
  need(0 <= data.randaugment_magnitude <= 10, "data.randaugment_magnitude", "in [0, 10]")
  need(not (data.trivial_augment and data.randaugment_ops), "data.trivial_augment",
       "false with data.randaugment_ops > 0 (one policy at a time)")
  need(0 <= data.random_erasing <= 1, "data.random_erasing", "a probability in [0, 1]")
  need(data.mixup_alpha >= 0, "data.mixup_alpha", ">= 0")
  need(data.cutmix_alpha >= 0, "data.cutmix_alpha", ">= 0")
  need(data.eval_image_size >= 0, "data.eval_image_size", ">= 0 (0: data.image_size)")
  need(data.eval_image_size == 0 or data.preprocess == "imagenet", "data.eval_image_size",
       "0 unless data.preprocess='imagenet' (fixed-size datasets evaluate at their size)")
  need(0 <= config.optimizer.bce_target_threshold < 1, "optimizer.bce_target_threshold",
       "in [0, 1)")
  group = config.model.bn_group_size
  need(group >= 0 and (group == 0 or (micro // num_devices) % group == 0 or
                       group % (micro // num_devices) == 0 and micro % group == 0),
       "model.bn_group_size", "0, or a size that tiles the per-device micro-batch "
       f"({micro // num_devices})")
  need(config.data.dataset != "image_folder" or bool(config.data.image_folder),
       "data.image_folder", "the folder holding <split>/<class>/images for dataset "
       "'image_folder'")
  need(config.data.image_size >= 0, "data.image_size", ">= 0")
  # Batches need one image shape: a user's folder is resized to it when prepared.
  need(config.data.dataset != "image_folder" or config.data.image_size > 0, "data.image_size",
       "> 0 for dataset 'image_folder' (images are resized to image_size x image_size)")
  need(len(config.data.mean) == len(config.data.std), "data.std",
       f"as many values as data.mean ({len(config.data.mean)})")
  need(all(v > 0 for v in config.data.std) or tuple(config.data.std) == (0.0,), "data.std",
       "positive values")
  need(config.data.crop_padding >= 0, "data.crop_padding", ">= 0")
  _check_preprocess(config, need)
  need(config.data.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0 (0 = whole split)")
  need(config.data.prefetch >= 0, "data.prefetch", ">= 0")
  need(config.eval_every_epochs > 0, "eval_every_epochs", "> 0")
  need(config.eval_every_steps == -1 or config.eval_every_steps > 0, "eval_every_steps",
       "> 0 (or -1: use eval_every_epochs)")
  need(config.log_every_steps > 0, "log_every_steps", "> 0")
  need(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "> 0")
  need(config.checkpoint.keep > 0, "checkpoint.keep", "> 0")


def _check_preprocess(config, need) -> None:
  """data.preprocess and the keys that only make sense with one of its values."""
  from resnet_jax.data import catalog
  data = config.data
  imagenet = data.preprocess == "imagenet"
  spec = catalog.DATASETS[data.dataset]
  need(imagenet or not spec.variable_size, "data.preprocess",
       f"'imagenet' for dataset '{data.dataset}' (its images vary in size, so batches need "
       "the crop to data.image_size)")
  need(not imagenet or data.image_size > 0, "data.image_size",
       "> 0 with data.preprocess='imagenet' (the size of the square crops)")
  need(not imagenet or data.crop_padding == 0, "data.crop_padding",
       "0 with data.preprocess='imagenet' (it random-resized-crops instead)")
  need(0 < data.crop_pct <= 1, "data.crop_pct", "in (0, 1] (0.875: 224 of 256)")
  need(data.eval_split not in spec.unlabeled_splits, "data.eval_split",
       f"a labelled split ('{data.eval_split}' of {data.dataset} has no labels)")
