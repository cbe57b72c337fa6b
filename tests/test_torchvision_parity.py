"""Logit parity with torchvision and timm: their model with random weights (BN running
statistics randomised too) -> .pth -> our converter -> JAX, same input, eval mode, fp32.

Skips where torchvision / timm cannot be imported (the project's own environment has no
torch). On a machine whose torchvision wheel cannot load, the same comparison runs through
experiments/torchvision_parity_local.py (the real resnet.py with stubbed helpers).
"""

import jax
import numpy as np
import pytest

from resnet_jax import convert, models
from resnet_jax.convert import weights_file

torch = pytest.importorskip("torch")

TOLERANCE = 1e-4      # max |Δlogit|, fp32 on both sides
SIZE = 129            # odd: every stride-2 layer sees an odd map (padding / ceil_mode paths)


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


def check_parity(module, name, tmp_path):
  module = randomise(module)
  path = str(tmp_path / f"{name}.pth")
  torch.save(module.state_dict(), path)
  variables, info = convert.import_file(path, name, "torchvision")
  model = models.create(name, num_classes=info["num_classes"])

  x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x)).numpy()
  got = np.asarray(jax.jit(model.apply)(variables, np.transpose(x, (0, 2, 3, 1))))
  assert got.shape == expected.shape
  delta = float(np.abs(got - expected).max())
  assert delta <= TOLERANCE, f"{name}: max|Δlogit| {delta:.2e}"

  # The way back: our export loads strictly and is the torch state dict, bit for bit.
  from safetensors.torch import load_file  # needs torch, hence not at the top
  ours = str(tmp_path / f"{name}.safetensors")
  exported_path = str(tmp_path / f"{name}_torch.safetensors")
  weights_file.save(ours, variables, name, info["preprocessing"], info["source"])
  convert.export_file(ours, exported_path)
  exported = load_file(exported_path)
  original = module.state_dict()
  module.load_state_dict(exported, strict=True)
  for key, value in original.items():
    assert torch.equal(exported[key], value) or key.endswith("num_batches_tracked"), key


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "wide_resnet50_2",
                                  "resnext50_32x4d"])
def test_torchvision_logits_match(name, tmp_path):
  tv_models = pytest.importorskip("torchvision.models")
  torch.manual_seed(0)
  check_parity(getattr(tv_models, name)(), name, tmp_path)


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50"])
def test_timm_logits_match(name, tmp_path):
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  check_parity(timm.create_model(name, pretrained=False), name, tmp_path)
