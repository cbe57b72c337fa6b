"""A flat state dict from a torch pickle (`.pth`, `.pt`, `.bin`, `.ckpt`, `.tar`), read with
torch.load(weights_only=True): torch's restricted unpickler builds tensors and plain
containers only, so a malicious file cannot run code through it.

numpy and torch only -- no JAX -- so tests/torch_side.py can check it in the PyTorch
interpreter (TensorFlow and torch in one process crash).
"""

from typing import Any, Mapping

import numpy as np

SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def read(path: str) -> dict[str, np.ndarray]:
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
                     f"weights_only=True refused it: {_first_line(e)})") from None
  state = unwrap_state_dict(path, obj)
  out = {}
  for key, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
      tensor = tensor.float()   # numpy has no bfloat16; our params are float32 anyway
    out[key] = tensor.numpy()
  return out


def unwrap_state_dict(path: str, obj: Any) -> Mapping[str, Any]:
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


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
