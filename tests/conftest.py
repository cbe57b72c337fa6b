"""Shared fixtures: a prepared digits dataset and helpers to run training for real."""

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "digits_resnet20.py")
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with sklearn_digits prepared once for the whole session."""
  path = str(tmp_path_factory.mktemp("tfds"))
  from resnet_jax.config_schema import base_config
  from resnet_jax.data import datasets
  cfg = base_config()
  cfg.data.data_dir = path
  datasets.prepare_builder(cfg.data)
  return path


def run_cli(args, *, devices: int = 1, env_extra=None, timeout=600):
  """Run `python -m resnet_jax ARGS` in a fresh process with `devices` fake CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "resnet_jax", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["split"] == split]
