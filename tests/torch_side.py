"""The PyTorch side of tests/test_torchvision_parity.py, run in an interpreter of its own
(TensorFlow and torch in one process crash): builds torchvision's or timm's model with
random weights, and checks our exported state dict against it.

  python tests/torch_side.py make SOURCE MODEL SIZE OUT_DIR
      -> OUT_DIR/state.safetensors (the state dict), input.npy (NCHW), logits.npy (eval)
  python tests/torch_side.py check-export SOURCE MODEL OUT_DIR EXPORTED.safetensors
      -> exit 0 when EXPORTED loads with strict=True and equals state.safetensors bit for bit
  python tests/torch_side.py read-pth TORCH_PICKLE_PY OUT_DIR
      -> exit 0 when resnet_jax/convert/torch_pickle.py (loaded from its file: it needs no
         JAX) reads .pth files as it should (see read_pth)

Standard library, numpy, torch, torchvision, timm and safetensors only (no resnet_jax).
"""

import sys

import numpy as np
import torch


def build(source: str, name: str):
  torch.manual_seed(0)
  if source == "torchvision":
    import torchvision
    return getattr(torchvision.models, name)()
  import timm
  return timm.create_model(name, pretrained=False)


def randomise(module, seed=0):
  """Non-default BN affine and running statistics (mean 0 / var 1 would hide a mean/var or
  scale/bias mix-up), non-zero biases."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
  return module.eval()


def make(source, name, size, out):
  from safetensors.torch import save_file
  module = randomise(build(source, name))
  state = {k: v.contiguous() for k, v in module.state_dict().items()}
  save_file(state, f"{out}/state.safetensors")
  x = np.random.default_rng(0).standard_normal((2, 3, int(size), int(size))).astype(np.float32)
  np.save(f"{out}/input.npy", x)
  with torch.no_grad():
    np.save(f"{out}/logits.npy", module(torch.from_numpy(x)).numpy())


def check_export(source, name, out, exported_path):
  from safetensors.torch import load_file
  original = load_file(f"{out}/state.safetensors")
  exported = load_file(exported_path)
  module = build(source, name)
  module.load_state_dict(exported, strict=True)      # raises on a missing/unexpected key
  differ = [k for k, v in original.items()
            if not k.endswith("num_batches_tracked") and not torch.equal(exported[k], v)]
  if differ:
    print(f"exported tensors differ from the originals: {', '.join(differ[:5])}")
    return 1
  return 0


class Payload:
  """Stands for any pickled object: unpickling it could run code, so it must be refused."""


def read_pth(module_path, out):
  """A DataParallel state dict inside a training checkpoint comes back unwrapped, exactly,
  bfloat16 as float32, through torch.load(weights_only=True) only; a pickle with an object
  in it is refused with one line."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("torch_pickle", module_path)
  torch_pickle = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torch_pickle)
  torch.manual_seed(0)
  state = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.running_var": torch.rand(4) + 0.5,
           "bn1.num_batches_tracked": torch.tensor(7), "fc.weight": torch.randn(2, 4)}
  path = f"{out}/resnet.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90,
              "half": None}, path)
  calls = []
  real_load = torch.load
  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real_load(*args, **kwargs)
  torch.load = spy
  try:
    back = torch_pickle.read(path)
  finally:
    torch.load = real_load
  problems = []
  if sorted(back) != sorted(state):
    problems.append(f"keys {sorted(back)}")
  problems += [k for k, v in state.items()
               if k in back and not np.array_equal(back[k], v.numpy())]
  if not calls or not all(c.get("weights_only") is True for c in calls):
    problems.append(f"torch.load called with {calls}")
  bf16 = f"{out}/bf16.pth"
  torch.save({"w": torch.ones(3, dtype=torch.bfloat16) / 3}, bf16)
  w = torch_pickle.read(bf16)["w"]
  if w.dtype != np.float32 or not np.array_equal(w, (torch.ones(3, dtype=torch.bfloat16) / 3)
                                                    .float().numpy()):
    problems.append(f"bfloat16 read as {w.dtype} {w}")
  evil = f"{out}/evil.pth"
  torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, evil)
  try:
    torch_pickle.read(evil)
    problems.append("a pickle holding an object was read")
  except ValueError as e:
    message = str(e)
    if "\n" in message or not message.startswith(evil) or \
        "weights_only=True refused it" not in message:
      problems.append(f"refusal message: {message!r}")
  if problems:
    print("; ".join(map(str, problems)))
    return 1
  return 0


def main(argv) -> int:
  command, *args = argv
  if command == "make":
    make(*args)
    return 0
  if command == "check-export":
    return check_export(*args)
  if command == "read-pth":
    return read_pth(*args)
  print(f"unknown command {command!r}")
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
