"""Shared fixtures: a prepared digits dataset and helpers to run training for real."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the session, in this process and every child
# it starts (they inherit the environment). Dozens of tests train the same small configs in
# fresh processes (kill and rerun, resume, multi-process); each compiled the same train and
# eval steps again, about half of such a run's time. A cache hit is the same executable
# XLA would compile (the key hashes the HLO, compile options and XLA flags), so no
# test's numbers change. It starts empty each session, so nothing carries over between
# code versions. A developer's own JAX_COMPILATION_CACHE_DIR wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="resnet_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
  _XLA_CACHE = None


def pytest_unconfigure(config):
  if _XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)

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


def cli_env(devices: int = 1, **extra) -> dict:
  """The environment of a child process with `devices` fake CPU devices."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", **extra)


def run_cli(args, *, devices: int = 1, env_extra=None, timeout=600):
  """Run `python -m resnet_jax ARGS` in a fresh process with `devices` fake CPU devices."""
  return subprocess.run([sys.executable, "-m", "resnet_jax", *args], cwd=REPO,
                        env=cli_env(devices, **(env_extra or {})),
                        capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["split"] == split]


def logged_step(workdir) -> int:
  """The last train step a (possibly still running) run has logged; 0 before the first."""
  try:
    return max((m["step"] for m in read_metrics(workdir)), default=0)
  except (FileNotFoundError, ValueError):
    return 0


def read_checkpoint(workdir, step):
  """The state saved at `step` in `workdir`, on this process's first device."""
  from resnet_jax.config_schema import base_config
  from resnet_jax.training.checkpoints import Checkpoints
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  try:
    return ckpts.read(step)
  finally:
    ckpts.close()


def copy_without_ema(run_dir, dest) -> str:
  """A copy of a run's workdir whose recorded config says it kept no EMA (ema_decay 0)."""
  shutil.copytree(run_dir, dest)
  with open(os.path.join(dest, "config.json")) as f:
    config = json.load(f)
  config["optimizer"]["ema_decay"] = 0.0
  with open(os.path.join(dest, "config.json"), "w") as f:
    json.dump(config, f)
  return str(dest)


def train_stream(builder, data_cfg, *, seed, process_index=0, process_count=1, start_step=0,
                 batch=64):
  """The trainer's input stream of one process: input_pipeline.train_batches over that
  process's split."""
  from resnet_jax.data import input_pipeline as ip
  split = ip.train_split_info(builder, data_cfg, process_index=process_index,
                              process_count=process_count)
  return ip.train_batches(builder, data_cfg, seed=seed, global_batch=batch,
                          start_step=start_step, split_info=split,
                          process_index=process_index, process_count=process_count)
