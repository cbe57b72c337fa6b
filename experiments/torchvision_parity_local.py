"""Logit parity with torchvision (and timm) on a machine where `import torchvision` fails.

Dev-only. torchvision's PyPI wheel for this machine is a CUDA build whose C++ ops do not
register with CPU torch, so the package cannot be imported -- but its model definition,
torchvision/models/resnet.py, is pure Python. This script writes a stand-in `torchvision`
package holding that *unmodified* file plus tiny stubs for the five helper modules it imports
(weights enums, API-usage logging, presets), so `torchvision.models.resnet50()` builds the
real architecture. timm imports a few torchvision names at import time (FrozenBatchNorm2d,
transforms, datasets) that ResNets never use; the stand-in answers any other
`torchvision.*` import with placeholder classes so timm can load.

Then, per model: random weights and randomised BN running statistics in torch, state_dict ->
our converter -> JAX; both run on the same random input in eval mode, fp32; prints
max|Δ| of logits and of every stage's output, and checks the way back (our export loads into
the torch model with strict=True and reproduces its state dict exactly).

Needs a Python with torch and jax (e.g. a venv with the project's deps plus the CPU torch
wheel; timm optional: `pip install timm --no-deps`):
  PYTHONPATH=. python experiments/torchvision_parity_local.py [--size 224] [--batch 2]
  PYTHONPATH=. python experiments/torchvision_parity_local.py --write-stub /tmp/tvstub
    (only writes the stand-in; then run the real test against it:
     PYTHONPATH=.:/tmp/tvstub python -m pytest tests/test_torchvision_parity.py)
"""

import argparse
import glob
import os
import sys
import tempfile
import time
import zipfile

import numpy as np

DEFAULT_WHEEL = "/tmp/tvw/torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCHVISION_MODELS = ("resnet18", "resnet50", "resnet101", "wide_resnet50_2",
                      "resnext50_32x4d")
TIMM_MODELS = ("resnet50d", "seresnet50")

_STUBS = {
    "__init__.py": '''"""Stand-in torchvision: the real models/resnet.py, stub helpers (dev)."""
import importlib.abc, importlib.machinery, sys, types
__version__ = "0.0+stub"


class _PlaceholderMeta(type):
  """Class attributes are placeholders too (InterpolationMode.BICUBIC and the like)."""
  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _PlaceholderMeta(name, (_Placeholder,), {})
    setattr(cls, name, value)
    return value


class _Placeholder(metaclass=_PlaceholderMeta):
  def __init__(self, *args, **kwargs):
    pass


class _PlaceholderModule(types.ModuleType):
  """Any other torchvision.* module: every public name is a placeholder class."""
  __path__ = []

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _PlaceholderMeta(name, (_Placeholder,), {})
    setattr(self, name, value)
    return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, fullname, path, target=None):
    if fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    return _PlaceholderModule(spec.name)

  def exec_module(self, module):
    pass


# Appended last: the real files of this package are found first.
sys.meta_path.append(_Finder())
''',
    "utils.py": "def _log_api_usage_once(obj):\n  pass\n",
    # timm reads transforms.ToTensor & co. at import time: placeholders here too (PEP 562).
    "transforms/__init__.py": "def __getattr__(name):\n"
                              "  if name.startswith('__'):\n    raise AttributeError(name)\n"
                              "  from torchvision import _Placeholder\n"
                              "  value = type(_Placeholder)(name, (_Placeholder,), {})\n"
                              "  globals()[name] = value\n"
                              "  return value\n",
    "transforms/_presets.py": "class ImageClassification:\n"
                              "  def __init__(self, *args, **kwargs):\n    pass\n",
    "models/__init__.py": "from .resnet import *\n",
    "models/_meta.py": "_IMAGENET_CATEGORIES = [f'class{i}' for i in range(1000)]\n",
    "models/_api.py": '''
class Weights:
  def __init__(self, url, transforms, meta):
    self.url, self.transforms, self.meta = url, transforms, meta


class WeightsEnum:
  @classmethod
  def verify(cls, obj):
    if obj is not None:
      raise ValueError("the stand-in torchvision has no pretrained weights")
    return obj


def register_model(name=None):
  return lambda fn: fn
''',
    "models/_utils.py": '''
def _ovewrite_named_param(kwargs, param, new_value):
  if param in kwargs and kwargs[param] != new_value:
    raise ValueError(f"The parameter '{param}' expected value {new_value} but got {kwargs[param]}")
  kwargs[param] = new_value


def handle_legacy_interface(**weights):
  return lambda builder: builder
''',
}


def _real_resnet_source(wheel: str) -> str:
  """torchvision/models/resnet.py from the wheel, else from an installed copy."""
  if os.path.isfile(wheel):
    with zipfile.ZipFile(wheel) as z:
      return z.read("torchvision/models/resnet.py").decode()
  found = glob.glob("/tmp/torchvenv/lib/python3*/site-packages/torchvision/models/resnet.py")
  if not found:
    raise SystemExit(f"no torchvision wheel at {wheel} and no installed copy")
  with open(found[0]) as f:
    return f.read()


def write_stub(dest: str, wheel: str = DEFAULT_WHEEL) -> str:
  root = os.path.join(dest, "torchvision")
  for rel, text in {**_STUBS, "models/resnet.py": _real_resnet_source(wheel)}.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  return dest


def torch_outputs(module, x):
  """{"stage1".."stage4", "logits"} of a torchvision/timm ResNet (NCHW), via hooks."""
  import torch  # noqa: PLC0415
  out = {}
  hooks = [getattr(module, f"layer{i}").register_forward_hook(
      lambda _m, _i, y, i=i: out.__setitem__(f"stage{i}", y.detach().numpy()))
           for i in range(1, 5)]
  with torch.no_grad():
    out["logits"] = module(torch.from_numpy(x)).numpy()
  for h in hooks:
    h.remove()
  return out


def compare(name: str, module, size: int, batch: int, seed: int = 0) -> dict:
  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from resnet_jax import convert, models  # noqa: PLC0415
  # The same randomisation as the test suite's parity check (main() puts tests/ on the path).
  from test_torchvision_parity import randomise  # noqa: PLC0415
  randomise(module, seed)
  state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  variables = convert.variables_from_state_dict(state, name)
  model = models.create(name, num_classes=variables["params"]["head"]["kernel"].shape[-1])
  x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
  ref = torch_outputs(module, x)
  ours = jax.jit(lambda v, y: model.apply(v, y, return_features=True))(
      variables, np.transpose(x, (0, 2, 3, 1)))
  result = {"logit_scale": float(np.abs(ref["logits"]).max())}
  for key in ("stage1", "stage2", "stage3", "stage4", "logits"):
    mine = np.asarray(ours[key])
    if mine.ndim == 4:
      mine = np.transpose(mine, (0, 3, 1, 2))
    result[key] = float(np.abs(mine - ref[key]).max())
  # The way back: our export must load strictly and reproduce the state dict bit for bit.
  exported = convert.torch_state_dict(variables, name)
  missing, unexpected = module.load_state_dict(
      {k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  result["export_exact"] = not missing and not unexpected and all(
      np.array_equal(exported[k], state[k]) for k in state)
  result["keys"] = len(state)
  result["num_batches_tracked"] = sum(k.endswith("num_batches_tracked") for k in state)
  return result


def _report(source: str, name: str, size: int, r: dict, seconds: float):
  stages = " ".join(f"{k}={r[k]:.1e}" for k in ("stage1", "stage2", "stage3", "stage4"))
  print(f"{source:11s} {name:17s} {size:4d} max|Δlogit|={r['logits']:.2e} "
        f"(max|logit| {r['logit_scale']:.2f}) {stages} keys={r['keys']} "
        f"nbt={r['num_batches_tracked']} export_exact={r['export_exact']} "
        f"[{seconds:.0f}s]", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, nargs="+", default=[224])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--wheel", default=DEFAULT_WHEEL)
  parser.add_argument("--models", nargs="+", default=None)
  parser.add_argument("--write-stub", metavar="DIR", default=None,
                      help="only write the stand-in torchvision package under DIR")
  args = parser.parse_args()
  if args.write_stub:
    print(write_stub(args.write_stub, args.wheel))
    return
  sys.path.insert(0, write_stub(tempfile.mkdtemp(prefix="tvstub-"), args.wheel))
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tests"))
  import torch  # noqa: PLC0415
  import torchvision.models as tvm  # noqa: PLC0415  (the stand-in)
  torch.set_num_threads(os.cpu_count() or 1)
  try:
    import timm  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001
    timm = None
    print(f"timm not importable ({type(e).__name__}: {e}); skipping timm models")
  jobs = [("torchvision", n, lambda n=n: getattr(tvm, n)()) for n in TORCHVISION_MODELS]
  if timm is not None:
    jobs += [(f"timm {timm.__version__}", n,
              lambda n=n: timm.create_model(n, pretrained=False)) for n in TIMM_MODELS]
  worst = 0.0
  for source, name, build in jobs:
    if args.models and name not in args.models:
      continue
    for size in args.size:
      start = time.time()
      r = compare(name, build(), size, args.batch)
      _report(source, name, size, r, time.time() - start)
      # NaN (e.g. a swapped mean/var gives sqrt of a negative) must not pass as 0.
      worst = max(worst, r["logits"] if np.isfinite(r["logits"]) else float("inf"))
  print(f"worst max|Δlogit| = {worst:.2e}")


if __name__ == "__main__":
  main()
