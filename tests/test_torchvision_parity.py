"""Logit parity with torchvision and timm: their model with random weights (BN running
statistics randomised too) -> its state dict -> our converter -> JAX, same input, eval
mode, fp32; and the way back: our export loads into their model with strict=True and is
their state dict, bit for bit.

The PyTorch side runs in an interpreter of its own (tests/torch_side.py; TensorFlow and
torch in one process crash): $RESNET_JAX_TORCH_PYTHON, which `./launch.sh test` sets up
once per machine with pinned torch / torchvision / timm (launch.sh: setup_torch_env), so CI
runs these tests for real. Run by hand without it, they skip and say how to get one.
"""

import os
import subprocess

import jax
import numpy as np
import pytest

from resnet_jax import convert, models
from resnet_jax.convert import weights_file

from conftest import REPO

TORCH_PYTHON = os.environ.get("RESNET_JAX_TORCH_PYTHON", "")
TOLERANCE = 1e-4      # max |Δlogit|, fp32 on both sides
SIZE = 129            # odd: every stride-2 layer sees an odd map (padding / ceil_mode paths)

pytestmark = pytest.mark.skipif(
    not TORCH_PYTHON, reason="no PyTorch interpreter: run ./launch.sh test (it sets one up) "
    "or set RESNET_JAX_TORCH_PYTHON to a python with torch, torchvision, timm, safetensors")


def _torch_side(*args):
  proc = subprocess.run([TORCH_PYTHON, os.path.join(REPO, "tests", "torch_side.py"), *args],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def check_parity(source, name, tmp_path):
  out = str(tmp_path)
  _torch_side("make", source, name, str(SIZE), out)
  variables, info = convert.import_file(f"{out}/state.safetensors", name, source)
  model = models.create(name, num_classes=info["num_classes"])
  x = np.load(f"{out}/input.npy")
  expected = np.load(f"{out}/logits.npy")
  got = np.asarray(jax.jit(model.apply)(variables, np.transpose(x, (0, 2, 3, 1))))
  assert got.shape == expected.shape
  delta = float(np.abs(got - expected).max())
  assert delta <= TOLERANCE, f"{name}: max|Δlogit| {delta:.2e}"

  ours = f"{out}/ours.safetensors"
  weights_file.save(ours, variables, name, info["preprocessing"], info["source"])
  convert.export_file(ours, f"{out}/exported.safetensors")
  _torch_side("check-export", source, name, out, f"{out}/exported.safetensors")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "wide_resnet50_2",
                                  "resnext50_32x4d"])
def test_torchvision_logits_match(name, tmp_path):
  check_parity("torchvision", name, tmp_path)


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50"])
def test_timm_logits_match(name, tmp_path):
  check_parity("timm", name, tmp_path)
