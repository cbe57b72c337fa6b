"""Keras Applications ResNets (v1 ResNet50/101/152, ResNet50V2/101V2/152V2) -> our variables.

Keras names its layers `conv{stage+1}_block{b}_{i}_{conv,bn}`; `_0_` is the projection
shortcut, `_1_`.. `_3_` the branch. In v2 each block opens with `_preact_bn`, so Keras' BN
`_k_bn` follows conv `_k_` and is our `bn{k+1}`. BN weights come as
[gamma, beta, moving_mean, moving_variance], convs as [HWIO kernel, bias], exactly our
layouts, so conversion is renaming only.
"""

import os
import re

import numpy as np

# Our name -> keras.applications class name.
KERAS_APPLICATIONS = {
    "resnet50_v1": "ResNet50", "resnet101_v1": "ResNet101", "resnet152_v1": "ResNet152",
    "resnet50_v2": "ResNet50V2", "resnet101_v2": "ResNet101V2", "resnet152_v2": "ResNet152V2",
}

# How the published Keras weights expect their input (keras.applications.*.preprocess_input):
# v1 is "caffe" mode (BGR, ImageNet mean subtracted in 0..255, no scaling), v2 is "tf" mode
# (x / 127.5 - 1). Keras evaluates at 224 after resizing the shorter side to 256.
_CAFFE = dict(image_size=224, crop_pct=0.875, interpolation="bilinear", channel_order="BGR",
              mean=[103.939, 116.779, 123.68], std=[1.0, 1.0, 1.0])
_TF = dict(image_size=224, crop_pct=0.875, interpolation="bilinear", channel_order="RGB",
           mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
PREPROCESSING = {name: dict(_CAFFE if name.endswith("_v1") else _TF)
                 for name in KERAS_APPLICATIONS}

_BLOCK = re.compile(r"conv(\d+)_block(\d+)_(preact|\d)_(conv|bn)$")


def our_path(layer_name: str, preact: bool) -> tuple[str, ...] | None:
  """Our module path for a Keras layer name; None for layers without weights we keep."""
  fixed = {"conv1_conv": ("stem_conv",), "conv1_bn": ("stem_bn",), "post_bn": ("final_bn",),
           "predictions": ("head",)}
  if layer_name in fixed:
    return fixed[layer_name]
  m = _BLOCK.match(layer_name)
  if not m:
    return None
  stage, block, index, kind = int(m[1]) - 1, int(m[2]), m[3], m[4]
  prefix = f"stage{stage}_block{block}"
  if index == "preact":
    return (prefix, "bn1")
  if index == "0":
    return (prefix, "shortcut", kind)
  k = int(index)
  if kind == "bn" and preact:
    k += 1
  return (prefix, f"{kind}{k}")


def _put(tree: dict, path: tuple[str, ...], leaves: dict):
  for key in path:
    tree = tree.setdefault(key, {})
  tree.update(leaves)


def from_keras_model(keras_model, model_name: str) -> dict:
  """{"params", "batch_stats"} (nested dicts of numpy arrays) from a built Keras model."""
  if model_name not in KERAS_APPLICATIONS:
    raise ValueError(f"model {model_name!r} has no Keras counterpart; "
                     f"expected one of {', '.join(KERAS_APPLICATIONS)}")
  preact = model_name.endswith("_v2")
  params, batch_stats = {}, {}
  for layer in keras_model.layers:
    weights = [np.asarray(w) for w in layer.get_weights()]
    if not weights:
      continue
    path = our_path(layer.name, preact)
    if path is None:
      raise ValueError(f"Keras layer {layer.name!r} has weights but no place in "
                       f"{model_name}: is this a {KERAS_APPLICATIONS[model_name]}?")
    if path[-1].startswith("bn") or path[-1].endswith("_bn"):
      gamma, beta, mean, var = weights
      _put(params, path, {"scale": gamma, "bias": beta})
      _put(batch_stats, path, {"mean": mean, "var": var})
    else:
      _put(params, path, dict(zip(("kernel", "bias"), weights)))
  variables = {"params": params, "batch_stats": batch_stats}
  _check_shapes(variables, model_name)
  return variables


def _check_shapes(variables: dict, model_name: str):
  """Every variable of our model present with its shape, and nothing else."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from resnet_jax import models  # noqa: PLC0415
  num_classes = variables["params"].get("head", {}).get("bias", np.zeros(0)).shape[0]
  model = models.create(model_name, num_classes=num_classes)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  flat = lambda t: {jax.tree_util.keystr(p): tuple(np.shape(x))  # noqa: E731
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  want, got = flat(dict(expected)), flat(variables)
  for key in sorted(want.keys() | got.keys()):
    if want.get(key) != got.get(key):
      raise ValueError(f"Keras weights do not fit {model_name} at {key}: {model_name} has "
                       f"{want.get(key, 'nothing')}, the Keras model {got.get(key, 'nothing')}")


def build_keras_model(model_name: str, num_classes: int = 1000, input_size: int | None = None):
  """The keras.applications model for one of our names, random weights, logits out."""
  import keras  # noqa: PLC0415  (only needed for Keras conversion)
  cls = getattr(keras.applications, KERAS_APPLICATIONS[model_name])
  shape = (input_size, input_size, 3) if input_size else None
  return cls(weights=None, classes=num_classes, input_shape=shape,
             classifier_activation=None)


def load_keras_file(path: str, model_name: str, num_classes: int) -> dict:
  """Our variables from a Keras `.weights.h5` (weights only) or `.keras` (whole model) file."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  if model_name not in KERAS_APPLICATIONS:
    raise ValueError(f"model {model_name!r} has no Keras counterpart; "
                     f"expected one of {', '.join(KERAS_APPLICATIONS)}")
  import keras  # noqa: PLC0415
  if path.endswith(".keras"):
    # safe_mode (the default) refuses to deserialise arbitrary Python lambdas.
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
  elif path.endswith(".h5"):
    model = build_keras_model(model_name, num_classes)
    model.load_weights(path)
  else:
    raise ValueError(f"{path}: expected a Keras .weights.h5 or .keras file")
  return from_keras_model(model, model_name)
