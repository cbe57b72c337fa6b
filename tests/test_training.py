"""Real training runs on real data through the whole path: config -> TFDS -> jit -> Orbax."""

import os
import re

import jax
import numpy as np
import pytest

from resnet_jax import config_cli
from resnet_jax.config_schema import check_keys_and_types, check_values
from resnet_jax.training import trainer

from conftest import DEFAULT_CONFIG, SHARED_DATA, read_checkpoint, read_metrics, run_cli


def _config(data_dir, **overrides):
  cfg = config_cli.load_config_file(DEFAULT_CONFIG)
  config_cli.apply_overrides(cfg, {"data.data_dir": data_dir,
                                   **{k: str(v) for k, v in overrides.items()}})
  check_keys_and_types(cfg)
  check_values(cfg, num_devices=jax.device_count(), num_processes=1)
  return cfg


def _restore_params(workdir, step):
  restored = read_checkpoint(workdir, step)
  return restored["params"], restored["batch_stats"]


def test_short_real_run_on_digits_learns(data_dir, tmp_path):
  # ResNet-8 for 6 epochs: chance is 10%; the full default reaches >97% (see README).
  cfg = _config(data_dir, **{"model.name": "resnet8", "num_epochs": 6,
                             "eval_every_epochs": 3, "schedule.warmup_epochs": 1})
  result = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert result["examples"] == 359                      # every test digit, exactly once
  assert result["top1"] >= 0.85, result
  evals = read_metrics(str(tmp_path), "eval")
  assert [e["step"] for e in evals] == [66, 132]
  train = read_metrics(str(tmp_path), "train")
  assert train[-1]["loss"] < train[0]["loss"]
  assert os.path.isfile(tmp_path / "config.json") and os.path.isdir(tmp_path / "tensorboard")


def test_train_lines_are_interval_means_and_grad_norms_are_logged_per_stage(data_dir,
                                                                           tmp_path):
  """log_every_steps=4 logs, at steps 4 and 8, the means of the per-step values an identical
  run logs every step (learning rate and param norm: the step's own); log_grad_norms=stage
  adds the norm of every stage's gradients, whose squares sum to the whole gradient's."""
  common = {"model.name": "resnet8", "num_train_steps": 8, "eval_every_epochs": 100,
            "log_grad_norms": "stage"}
  each, means = str(tmp_path / "each"), str(tmp_path / "means")
  trainer.train_and_evaluate(_config(data_dir, log_every_steps=1, **common), each)
  # eval_every_steps (over eval_every_epochs) evaluates; evaluation changes no training.
  trainer.train_and_evaluate(_config(data_dir, log_every_steps=4, eval_every_steps=3,
                                     **common), means)
  per_step, logged = read_metrics(each), read_metrics(means)
  assert [m["step"] for m in logged] == [4, 8]
  assert [e["step"] for e in read_metrics(means, "eval")] == [3, 6, 8]
  groups = ["grad_norm/stem", "grad_norm/stage1", "grad_norm/stage2", "grad_norm/stage3",
            "grad_norm/head"]
  for m in per_step:
    assert set(groups) <= set(m) and not any(k.startswith("grad_norm/stage1_") for k in m)
    np.testing.assert_allclose(np.sqrt(sum(m[g] ** 2 for g in groups)), m["grad_norm"],
                               rtol=1e-5)
  for line, window in zip(logged, (per_step[:4], per_step[4:])):
    for key in ("loss", "accuracy", "grad_norm", *groups):
      np.testing.assert_allclose(line[key], np.mean([m[key] for m in window]), rtol=1e-5,
                                 err_msg=key)
    for key in ("learning_rate", "param_norm"):
      assert line[key] == window[-1][key], key


def test_stop_and_rerun_resumes_at_step_k_and_matches_uninterrupted(data_dir, tmp_path):
  common = {"model.name": "resnet8", "num_train_steps": 12, "log_every_steps": 1,
            "checkpoint.every_steps": 100, "eval_every_epochs": 100}
  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  trainer.train_and_evaluate(_config(data_dir, **common), full_dir)

  stopped = trainer.train_and_evaluate(_config(data_dir, stop_after_steps=5, **common),
                                       split_dir)
  assert stopped == {"step": 5, "stopped": True}
  assert 5 in [int(d) for d in os.listdir(os.path.join(split_dir, "checkpoints"))]
  result = trainer.train_and_evaluate(_config(data_dir, **common), split_dir)
  assert result["step"] == 12
  steps_logged = [m["step"] for m in read_metrics(split_dir)]
  assert steps_logged == list(range(1, 13)), "the rerun must continue at step 6, not restart"

  # Same command, same device count: the resumed run is the same run, bit for bit.
  for a, b in zip(_restore_params(full_dir, 12), _restore_params(split_dir, 12)):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_eight_devices_give_the_same_losses_as_one(data_dir, tmp_path):
  """Same global batch on 1 and 8 fake CPU devices: BN uses global-batch statistics, so the
  runs differ only by float reduction order. rtol 1e-4 over 6 steps is ~100x the drift seen."""
  args = ["--config=configs/digits_resnet20.py", f"--config.data.data_dir={data_dir}",
          "--config.model.name=resnet8", "--config.num_train_steps=6",
          "--config.log_every_steps=1", "--config.data.batch_size=64",
          "--config.eval_every_epochs=100"]
  losses = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f"d{devices}")
    proc = run_cli(args + [f"--workdir={workdir}"], devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"{devices} devices on 1 process", proc.stdout)
    losses[devices] = [m["loss"] for m in read_metrics(workdir)]
  assert len(losses[1]) == 6
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-4)
  assert losses[1][0] != losses[1][-1]


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "fashion_mnist")),
                    reason="../shared/data/fashion_mnist not present")
def test_official_tfds_fashion_mnist_builder_from_manual_dir(tmp_path):
  cfg = config_cli.load_config_file(os.path.join(os.path.dirname(DEFAULT_CONFIG),
                                                 "mnist_resnet20.py:fashion_mnist"))
  config_cli.apply_overrides(cfg, {"data.data_dir": str(tmp_path / "tfds"),
                                   "data.manual_dir": os.path.join(SHARED_DATA, "fashion_mnist"),
                                   "model.name": "resnet8", "num_train_steps": "40",
                                   "schedule.name": "constant", "schedule.warmup_epochs": "0",
                                   "optimizer.learning_rate": "0.05",
                                   "eval_every_epochs": "100", "data.eval_batch_size": "1000"})
  check_keys_and_types(cfg)
  result = trainer.train_and_evaluate(cfg, str(tmp_path / "work"))
  assert result["examples"] == 10_000
  assert result["top1"] > 0.5, result       # 40 steps; chance is 0.1


@pytest.mark.skipif(not all(os.path.isdir(os.path.join(SHARED_DATA, d))
                            for d in ("mnist", "fashion_mnist")),
                    reason="../shared/data/mnist and fashion_mnist not present")
def test_mnist_and_fashion_mnist_from_manual_files_in_one_data_dir_stay_themselves(tmp_path):
  """Both ship files of the same names; TFDS names a manual file's extracted copy after the
  file alone, so the second dataset prepared in a shared data_dir used to be made of the
  first one's images. Each prepared test split must hold its own official images (TFDS
  stores them in another order: compared as a sum over every pixel)."""
  import gzip
  from resnet_jax.config_schema import base_config
  from resnet_jax.data import datasets
  for name in ("mnist", "fashion_mnist"):
    cfg = base_config().data
    cfg.dataset, cfg.data_dir = name, str(tmp_path / "tfds")
    cfg.manual_dir = os.path.join(SHARED_DATA, name)
    builder = datasets.prepare_builder(cfg)
    prepared = sum(int(ex["image"].sum(dtype=np.int64))
                   for ex in builder.as_dataset(split="test").as_numpy_iterator())
    with gzip.open(os.path.join(SHARED_DATA, name, "t10k-images-idx3-ubyte.gz")) as f:
      official = int(np.frombuffer(f.read()[16:], np.uint8).sum(dtype=np.int64))
    assert prepared == official, name
