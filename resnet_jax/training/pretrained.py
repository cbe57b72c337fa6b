"""model.pretrained: start a run from a resnet_jax weights file (`python -m resnet_jax.convert`
or an export of a run).

Only a fresh run takes the weights: a run that resumes its own checkpoint continues from
that. Every params / batch_stats array of the model as configured must be in the file with
the same shape; the one exception is the classifier head when the file has another number
of classes (or none): it keeps its fresh init, so ImageNet weights fine-tune on a 10-class
dataset as they are. The optimizer state is rebuilt for the loaded params, and the EMA
copies (optimizer.ema_decay > 0) start from them.

The file's preprocessing fills data.mean / data.std / data.channel_order where the config
leaves them at their defaults, when the config is resolved (every run, resumed ones
included, so a run always normalises the same way, and config.json records it); image_size
and crop_pct stay the config's (a line says when they differ).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.convert import weights_file
from resnet_jax.data import catalog
from resnet_jax.errors import ConfigError
from resnet_jax.training.metrics_log import log_main as _log

KEY = "model.pretrained"
HEAD = "head"
COLLECTIONS = ("params", "batch_stats")


def _error(message: str) -> ConfigError:
  return ConfigError(f"config key '{KEY}': {message}")


def resolve_path(config) -> str:
  return os.path.expanduser(config.model.pretrained) if config.model.pretrained else ""


def read_info(path: str, model_name: str) -> dict:
  """The file's header (model, num_classes, preprocessing, source): ConfigError naming the
  key and the file when it is missing, not ours, or holds another model."""
  try:
    info = weights_file.read_info(path)
    info["preprocessing"] = weights_file.check_preprocessing(info["preprocessing"])
  except ValueError as e:
    raise _error(weights_file.first_line(e)) from None
  if info["model"] != model_name:
    raise _error(f"{path} holds {info['model']} weights, config key 'model.name' is "
                 f"{model_name!r}; set --config.model.name={info['model']} or use "
                 f"{model_name} weights")
  return info


def settle_preprocessing(config) -> list[str]:
  """When the config is resolved: data.mean / data.std / data.channel_order from the
  model.pretrained file where the config leaves them at their defaults (data.std == (0.0,);
  channel_order "RGB"), so config.json and the checkpoints record what the run uses.
  Returns the lines saying what was taken (for the run's log). ConfigError for a file that
  is missing, not ours, or of another model."""
  path = resolve_path(config)
  if not path:
    return []
  data_cfg = config.data
  pre = read_info(path, config.model.name)["preprocessing"]
  taken = []
  if len(catalog.DATASETS[data_cfg.dataset].mean) == len(pre["mean"]):
    # (else the stem does not fit the data: load_variables says so)
    if data_cfg.channel_order == "RGB" and pre["channel_order"] != "RGB":
      data_cfg.channel_order = pre["channel_order"]
      taken.append(f"data.channel_order={pre['channel_order']}")
    if tuple(data_cfg.std) == (0.0,):
      data_cfg.mean = tuple(float(v) for v in pre["mean"])
      data_cfg.std = tuple(float(v) for v in pre["std"])
      taken.append(f"data.mean={data_cfg.mean} data.std={data_cfg.std}")
  if not taken:
    return []
  kept = (" (the config's data.mean/std are read in that order)"
          if len(taken) == 1 and taken[0].startswith("data.channel_order") else "")
  return [f"{KEY}: {' '.join(taken)} taken from {path}{kept}"]


def report_differences(config, image_shape) -> None:
  """Log where the run's image size / crop / interpolation differ from the file's."""
  path, data_cfg = resolve_path(config), config.data
  pre = read_info(path, config.model.name)["preprocessing"]
  differ = []
  if image_shape[0] != pre["image_size"]:
    differ.append(f"image_size {pre['image_size']} (this run: {image_shape[0]})")
  if data_cfg.preprocess == "imagenet":
    if data_cfg.crop_pct != pre["crop_pct"]:
      differ.append(f"crop_pct {pre['crop_pct']} (this run: {data_cfg.crop_pct})")
    if pre["interpolation"] != data_cfg.interpolation:
      differ.append(f"{pre['interpolation']} resizes (this run: {data_cfg.interpolation})")
    if not data_cfg.antialias:
      differ.append("antialiased resizes as PIL's (this run: data.antialias=false)")
  if differ:
    _log(f"{KEY}: {path} was made for {', '.join(differ)}; keeping the config's")


def load_variables(path: str, abstract_state, *, num_classes: int, model_name: str,
                   channels: int) -> dict:
  """{collection: {path tuple: numpy array or None}} for every leaf of the state's params
  and batch_stats; None where the fresh init stays (the head, when the class counts differ).
  ConfigError naming the first leaf that is missing from the file or has another shape."""
  try:
    variables, info = weights_file.load(path)
  except ValueError as e:
    raise _error(weights_file.first_line(e)) from None
  new_head = info["num_classes"] != num_classes
  out = {}
  for collection in COLLECTIONS:
    want = traverse_util.flatten_dict(getattr(abstract_state, collection) or {})
    got = traverse_util.flatten_dict(variables.get(collection, {}))
    leaves = {}
    for key in sorted(want):
      name = "/".join((collection,) + key)
      if new_head and key[0] == HEAD:
        leaves[key] = None
        continue
      if key not in got:
        raise _error(f"{path} has no {name}, which {model_name} as configured has")
      shape, expected = tuple(np.shape(got[key])), tuple(want[key].shape)
      if shape != expected:
        hint = (f" (the data has {channels} channel(s))"
                if key[0].startswith("stem_conv") and key[-1] == "kernel" else "")
        raise _error(f"{path}: {name} has shape {shape}, {model_name} as configured needs "
                     f"{expected}{hint}")
      leaves[key] = np.asarray(got[key], dtype=want[key].dtype)
    unexpected = sorted(k for k in got if k not in want and not (new_head and k[0] == HEAD))
    if unexpected:
      raise _error(f"{path}: {'/'.join((collection,) + unexpected[0])} is not in "
                   f"{model_name} as configured")
    out[collection] = leaves
  loaded = sum(v is not None for leaves in out.values() for v in leaves.values())
  _log(f"{KEY}: {loaded} arrays from {path}" +
       (f" ({info['source']})" if info.get("source") else ""))
  if new_head:
    was = (f"{info['num_classes']} -> {num_classes} classes" if info["num_classes"]
           else f"the file has none; {num_classes} classes")
    _log(f"{KEY}: classifier head re-initialised ({was})")
  return out


def apply(state, loaded: dict, tx, state_sharding, *, ema: bool):
  """`state` (freshly initialised, sharded as `state_sharding`) with the loaded params and
  batch_stats in place, its optimizer state rebuilt for them and its EMA copies equal to
  them; sharded as before."""
  def merge(collection):
    fresh = traverse_util.flatten_dict(getattr(state, collection))
    shardings = traverse_util.flatten_dict(getattr(state_sharding, collection))
    # Every process holds the whole file: device_put keeps the slices of its devices.
    return traverse_util.unflatten_dict({
        key: x if loaded[collection][key] is None
        else jax.device_put(loaded[collection][key], shardings[key])
        for key, x in fresh.items()})

  params, batch_stats = merge("params"), merge("batch_stats")

  def reseat(state, params, batch_stats):
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    return state.replace(
        params=params, batch_stats=batch_stats, opt_state=tx.init(params),
        ema_params=copy(params) if ema else state.ema_params,
        ema_batch_stats=copy(batch_stats) if ema else state.ema_batch_stats)

  # No donation: the fresh head's arrays are both in `state` and in `params`.
  return jax.jit(reseat, out_shardings=state_sharding)(state, params, batch_stats)
