"""Our variables <-> a flat torchvision / timm state dict, numpy arrays both ways.

Every tensor's torch key is derived from its path in our variable tree, so each registered
model with a torch layout converts without a per-model table:

  ours (module path)                     torch (module prefix)
  stem_conv, stem_bn                     conv1, bn1
  stem_conv1, stem_bn1 (deep stem)       conv1.0, conv1.1     (conv1 is a Sequential with
  stem_conv2, stem_bn2                   conv1.3, conv1.4      ReLUs at .2 and .5; the
  stem_conv3, stem_bn3                   conv1.6, bn1          last BN is the model's bn1)
  stage{s}_block{b}/conv{k}, bn{k}       layer{s}.{b-1}.conv{k}, .bn{k}
  .../shortcut/conv, shortcut/bn         .downsample.0, .1    (avg_down: .1, .2 -- .0 is
                                                               the parameterless pool)
  .../se/reduce, se/expand               .se.fc1, .se.fc2     (timm's SEModule)
  head                                   fc

Leaves: conv kernel HWIO <-> weight OIHW (grouped convs alike: flax's I is in/groups, as
torch's), Dense kernel (in, out) <-> weight (out, in), bias <-> bias, BN scale/bias/mean/var
<-> weight/bias/running_mean/running_var. torch's BN also keeps num_batches_tracked, which
eval never reads: ignored on import, written as int64 0 on export so that
`load_state_dict(strict=True)` accepts the file.

Pure numpy: the caller supplies the target tree's shapes (see weights_file.abstract_variables).
"""

import re
from typing import Any, Mapping

import numpy as np

_LEAVES = {"params": {"kernel": "weight", "bias": "bias", "scale": "weight"},
           "batch_stats": {"mean": "running_mean", "var": "running_var"}}
_STEM = {"stem_conv": "conv1", "stem_bn": "bn1",
         "stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3",
         "stem_bn2": "conv1.4", "stem_conv3": "conv1.6", "stem_bn3": "bn1"}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)$")
_BLOCK_LAYERS = re.compile(r"(conv|bn)\d+$")
_SE = {"reduce": "fc1", "expand": "fc2"}
NUM_BATCHES_TRACKED = "num_batches_tracked"


class LayoutError(ValueError):
  """A tree or state dict that does not fit the torch layout (message: one line)."""


def module_key(path: tuple[str, ...], avg_down: bool = False) -> str:
  """The torch module prefix of one of our module paths, e.g. ('stage1_block1', 'conv1')."""
  head, rest = path[0], path[1:]
  if not rest and head in _STEM:
    return _STEM[head]
  if not rest and head == "head":
    return "fc"
  m = _BLOCK.match(head)
  if m and rest:
    prefix = f"layer{m[1]}.{int(m[2]) - 1}"
    if len(rest) == 1 and _BLOCK_LAYERS.match(rest[0]):
      return f"{prefix}.{rest[0]}"
    if len(rest) == 2 and rest[0] == "shortcut" and rest[1] in ("conv", "bn"):
      # timm's avg_down shortcut is Sequential(pool, conv, bn): the pool takes index 0.
      index = {"conv": 0, "bn": 1}[rest[1]] + (1 if avg_down else 0)
      return f"{prefix}.downsample.{index}"
    if len(rest) == 2 and rest[0] == "se" and rest[1] in _SE:
      return f"{prefix}.se.{_SE[rest[1]]}"
  raise LayoutError(f"our module {'/'.join(path)!r} has no torch counterpart "
                    "(pre-activation and Keras-layout models are not torch-layout)")


def leaf_key(collection: str, path: tuple[str, ...], avg_down: bool = False) -> str:
  """The torch key of one of our leaves ('params' or 'batch_stats', path ending with the
  leaf name). Leaf names alone decide: `scale`/`mean`/`var` only exist in BatchNorm, and a
  `bias` is called `bias` in both conv and BN."""
  leaf = path[-1]
  names = _LEAVES[collection]
  if leaf not in names:
    raise LayoutError(f"unexpected {collection} leaf {'/'.join(path)!r}")
  return f"{module_key(path[:-1], avg_down)}.{names[leaf]}"


def _torch_axes(leaf: str, ndim: int) -> tuple[int, ...]:
  """Our axes in the order torch stores them: conv kernels HWIO -> OIHW, dense kernels
  (in, out) -> (out, in), everything else as is."""
  if leaf == "kernel" and ndim == 4:
    return (3, 2, 0, 1)
  if leaf == "kernel" and ndim == 2:
    return (1, 0)
  return tuple(range(ndim))


def to_torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape torch stores for one of our leaves of `shape`."""
  return tuple(shape[a] for a in _torch_axes(leaf, len(shape)))


def _to_torch_array(leaf: str, x: np.ndarray) -> np.ndarray:
  # safetensors (and torch.from_numpy users) want contiguous buffers.
  return np.ascontiguousarray(np.transpose(x, _torch_axes(leaf, x.ndim)))


def _from_torch_array(leaf: str, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, np.argsort(_torch_axes(leaf, x.ndim))))


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  """{path tuple: leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _leaves(variables: Mapping[str, Any]):
  """(collection, path, leaf) for params and batch_stats, in a stable order."""
  for collection in ("params", "batch_stats"):
    for path, leaf in flatten(variables.get(collection, {})).items():
      yield collection, path, leaf


def to_torch(variables: Mapping[str, Any], avg_down: bool = False) -> dict[str, np.ndarray]:
  """Our {"params", "batch_stats"} -> a torch state dict (str -> numpy array)."""
  extra = set(variables) - {"params", "batch_stats"}
  if extra:
    raise LayoutError(f"unexpected variable collections {sorted(extra)}")
  state = {}
  for collection, path, leaf in _leaves(variables):
    state[leaf_key(collection, path, avg_down)] = _to_torch_array(path[-1], np.asarray(leaf))
    if collection == "batch_stats" and path[-1] == "mean":
      bn = module_key(path[:-1], avg_down)
      state[f"{bn}.{NUM_BATCHES_TRACKED}"] = np.zeros((), np.int64)
  return state


def from_torch(state: Mapping[str, np.ndarray], template: Mapping[str, Any], *,
               avg_down: bool = False, model_name: str = "the model",
               drop_head: bool = False) -> dict:
  """A torch state dict -> our {"params", "batch_stats"} shaped as `template`.

  template: our variable tree whose leaves have `.shape` (jax.eval_shape output or arrays).
  drop_head: ignore the file's `fc.*` (importing a classifier as a headless backbone).
  Every template leaf must be found with the right shape and every file tensor used
  (num_batches_tracked aside); otherwise LayoutError names the culprits in one line.
  Floating tensors become float32 (our parameter dtype; exact for float32 files).
  """
  flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
  missing, mismatched, used = [], [], set()
  for collection, path, leaf in _leaves(template):
    key = leaf_key(collection, path, avg_down)
    want = to_torch_shape(path[-1], tuple(leaf.shape))
    if key not in state:
      missing.append(f"{key} {want}")
      continue
    used.add(key)
    array = np.asarray(state[key])
    if tuple(array.shape) != want:
      mismatched.append(f"{key}: file has {tuple(array.shape)}, {model_name} expects {want}")
      continue
    if np.issubdtype(array.dtype, np.floating):
      array = array.astype(np.float32, copy=False)
    flat[collection][path] = _from_torch_array(path[-1], array)
  unexpected = [k for k in state if k not in used
                and not k.endswith("." + NUM_BATCHES_TRACKED)
                and not (drop_head and k.startswith("fc."))]
  problems = _describe("shape mismatch", mismatched) + _describe("missing", missing) + \
      _describe("unexpected", sorted(unexpected))
  if problems:
    raise LayoutError(f"state dict does not fit {model_name}: " + "; ".join(problems))
  return {c: unflatten(leaves) for c, leaves in flat.items()}


def _describe(kind: str, items: list[str], show: int = 3) -> list[str]:
  # One line however many keys are wrong: the first few by name, then a count.
  if not items:
    return []
  more = f" (+{len(items) - show} more)" if len(items) > show else ""
  return [f"{kind} {', '.join(items[:show])}{more}"]
