"""Every config key, its type and its neutral default; and the checks run before training.

Experiment files in `configs/` start from `base_config()` and set what the experiment is
about. Anything they add that is not declared here is a typo and is reported as such,
whether it came from the file or from a `--config.key=value` override.
"""

import difflib
import os

import ml_collections

from resnet_jax.errors import ConfigError


DATA_ROOT_DEFAULT = "~/resnet_jax_data"


def data_root() -> str:
  """Where configs find dataset files that TFDS cannot download for them (e.g. the JPEG
  copy of CIFAR-10): $RESNET_JAX_DATA, default ~/resnet_jax_data."""
  return os.path.expanduser(os.environ.get("RESNET_JAX_DATA") or DATA_ROOT_DEFAULT)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.lowering = "auto"                 # how layers run: auto | native | onednn | cpu (the last
                                      #   two: CPU backend, resnet_jax/cpu_speed); same numbers,
                                      #   different speed (resnet_jax/lowering.py)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"
  c.model.dtype = "float32"           # compute dtype; params and BN statistics stay fp32
  c.model.zero_init_last_bn = False
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 0.0            # 0 = as the named model (1e-5; Keras-layout v1/v2: 1.001e-5)
  c.model.se_ratio = -1.0             # squeeze-excitation ratio; -1 = as the named model
  c.model.drop_path_rate = 0.0        # stochastic depth at the last block (linear from 0)
  c.model.bn_group_size = 0           # 0: BN over the global batch; G: "ghost" BN per G examples
  c.model.pretrained = ""             # path to a resnet_jax .safetensors (from `python -m
                                      #   resnet_jax.convert` or an export): params and
                                      #   batch_stats initialise from it (the head afresh if
                                      #   num_classes differs); its mean/std/channel_order
                                      #   fill data keys left at default. A run resuming its
                                      #   own checkpoint continues from that instead.

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "sklearn_digits"   # a key of resnet_jax.data.catalog.DATASETS
  c.data.data_dir = ""                # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.manual_dir = ""              # files TFDS prepares from instead of downloading
  c.data.image_folder = ""            # dataset "image_folder": <root>/<split>/<class>/img
  c.data.image_size = 0               # image_folder (required): resize to this square size;
                                      #   preprocess "imagenet" (required): the crop size
  c.data.corrupt_images = "skip"      # image_folder: skip (and count) | error
  c.data.mean = (0.0,)                # per-channel, 0..255 units; (0.0,) = dataset default
  c.data.std = (0.0,)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.batch_size = 128             # global, over all devices and processes
  c.data.eval_batch_size = 0          # 0 -> batch_size
  c.data.process_sharding = "batch"   # batch: each process reads the split, keeps its slice
                                      #   of every global batch (same batches for any
                                      #   process count); split: each reads 1/n (ImageNet)
  c.data.shuffle_buffer = 0           # 0 -> the whole (per-process) train split
  c.data.cache = True                 # keep decoded examples in memory (small datasets)
  c.data.prefetch = 2                 # batches prepared ahead on the host
  c.data.crop_padding = 0             # train: pad by this many pixels, random-crop back
  c.data.random_flip = False          # train: random left-right flip
  c.data.preprocess = "cifar"         # cifar: fixed-size decoded images, optional pad-crop
                                      #   (crop_padding) and flip; imagenet: images stay
                                      #   encoded, train random-resized crop + flip, eval
                                      #   resize + center crop (data/imagenet_preprocess.py)
  c.data.crop_pct = 0.875             # imagenet eval: center image_size crop of the image
                                      #   resized to image_size / crop_pct (224 of 256)
  c.data.antialias = False            # imagenet: antialiased resizes (True: as torchvision
                                      #   with PIL; False: TF's reference recipe, faster)
  c.data.channel_order = "RGB"        # RGB | BGR (Caffe-style weights); data.mean/std are in
                                      #   this order (dataset defaults are flipped for BGR)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.1     # peak learning rate
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4     # L2 on conv/dense kernels only (not BN, not biases)
  c.optimizer.label_smoothing = 0.0
  c.optimizer.grad_accum_steps = 1    # K: each step averages gradients of K micro-batches
  c.optimizer.ema_decay = 0.0         # > 0: keep an EMA of params and BN stats, eval both

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"          # cosine | step | constant
  c.schedule.warmup_epochs = 0.0
  c.schedule.warmup_steps = 0         # > 0: the warm-up's length in steps (over warmup_epochs)
  c.schedule.warmup_shape = "linear"  # linear: 0 -> peak; constant: warmup_factor x peak
  c.schedule.warmup_factor = 0.1      # constant warm-up: this fraction of the peak
  c.schedule.decay_epochs = (0.0,)    # step: epochs at which lr *= decay_factor
  c.schedule.decay_steps = (0,)       # step: the same in steps (over decay_epochs when set)
  c.schedule.decay_factor = 0.1

  c.num_epochs = 1.0
  c.num_train_steps = -1              # > 0 overrides num_epochs
  c.stop_after_steps = -1             # > 0: save and exit at this step (resume later)
  c.eval_only = False                 # evaluate the starting state (model.pretrained, or the
                                      #   workdir's latest checkpoint) and stop: no training,
                                      #   no checkpoint written (results.json is)
  c.eval_every_epochs = 1.0
  c.log_every_steps = 50              # train metrics: means over the steps between lines
  c.log_grad_norms = "none"           # none | stage | block: also log each one's gradient norm
  c.nan_policy = "stop"               # non-finite loss/grads/params: stop | skip (and count)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.best_metric = "top1"   # also keep the best save by this eval metric; "" = off
  c.checkpoint.best_mode = "max"      # max | min

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # devices on the data axis; -1 = all / fsdp
  c.mesh.fsdp = 1                     # > 1: split params and optimizer state over this many
  return c


_CHOICES = {
    "lowering": ("auto", "native", "onednn", "cpu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "schedule.name": ("cosine", "step", "constant"),
    "schedule.warmup_shape": ("linear", "constant"),
    "nan_policy": ("stop", "skip"),
    "log_grad_norms": ("none", "stage", "block"),
    "data.corrupt_images": ("skip", "error"),
    "data.process_sharding": ("batch", "split"),
    "data.preprocess": ("cifar", "imagenet"),
    "data.channel_order": ("RGB", "BGR"),
    "checkpoint.best_mode": ("max", "min"),
    "checkpoint.best_metric": ("", "top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"),
}


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

  for key, choices in _CHOICES.items():
    need(_get(config, key) in choices, key, f"one of {', '.join(map(repr, choices))}")
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
