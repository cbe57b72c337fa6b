"""The input pipeline: resumable, identical global batches for any process count ("batch"),
or each process its own shard ("split"); eval covers every example once."""

import functools
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax.config_schema import base_config
from resnet_jax.data import datasets, input_pipeline as ip

from conftest import REPO, train_stream


@pytest.fixture(scope="module")
def builder(data_dir):
  cfg = base_config()
  cfg.data.data_dir = data_dir
  return datasets.prepare_builder(cfg.data)


def _cfg(mode="batch", **kw):
  cfg = base_config()
  cfg.data.process_sharding = mode
  cfg.data.crop_padding = kw.get("crop_padding", 1)
  return cfg.data


_stream = functools.partial(train_stream, seed=3)


def test_batch_mode_gives_the_same_global_batches_for_any_process_count(builder):
  one = _stream(builder, _cfg())
  parts = [_stream(builder, _cfg(), process_index=i, process_count=4) for i in range(4)]
  for _ in range(30):  # crosses an epoch boundary (22 steps/epoch)
    whole = next(one)
    local = [next(p) for p in parts]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole[key])


def test_resume_rebuilds_the_same_batches_mid_epoch(builder):
  full = _stream(builder, _cfg())
  batches = [next(full) for _ in range(40)]
  resumed = _stream(builder, _cfg(), start_step=27)
  for k in range(27, 40):
    b = next(resumed)
    np.testing.assert_array_equal(b["image"], batches[k]["image"])
    np.testing.assert_array_equal(b["label"], batches[k]["label"])


def _digest(image, label):
  return hashlib.sha1(image.tobytes() + bytes([int(label)])).hexdigest()


def test_split_mode_each_process_walks_its_own_shard(builder):
  cfg = _cfg("split", crop_padding=0)   # no augmentation: compare raw examples
  seen = []
  for p in range(2):
    split = ip.process_split(builder, "train", drop_remainder=True, process_index=p,
                             process_count=2)
    shard = [_digest(ex["image"], ex["label"]) for ex in
             builder.as_dataset(split=split.read_split).as_numpy_iterator()]
    steps = split.num_examples // 32
    stream = _stream(builder, cfg, process_index=p, process_count=2)
    epoch = [_digest(i, l) for _ in range(steps) for b in [next(stream)]
             for i, l in zip(b["image"], b["label"])]
    assert len(epoch) == steps * 32
    assert set(epoch) <= set(shard) and len(set(epoch)) >= len(set(shard)) - 32
    seen.append(set(shard))
  assert len(seen[0] & seen[1]) <= 5, "shards are disjoint (up to duplicate digit scans)"


def test_eval_covers_every_example_once_across_processes(builder):
  cfg = _cfg()
  labels = []
  for p in range(3):
    split = ip.process_split(builder, "test", drop_remainder=False, process_index=p,
                             process_count=3)
    n = ip.num_eval_batches(split.num_examples_total, 3, 50)
    assert n == 3   # ceil(ceil(359 / 3) / 50): the same on every process
    for b in ip.eval_batches(builder, cfg, batch_size=50, split_info=split, num_batches=n,
                             dataset_cache={}):
      labels.extend(b["label"][b["mask"]])
  full = [ex["label"] for ex in builder.as_dataset(split="test").as_numpy_iterator()]
  assert sorted(labels) == sorted(full) and len(labels) == 359


def test_benchmark_command_runs_and_reports_every_device_count(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "-m", "resnet_jax.benchmark", "--model", "resnet8",
                         "--image-size", "8", "--batch-per-device", "4", "--devices", "1,2",
                         "--steps", "2", "--warmup", "1", f"--json={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.load(open(out))["rows"]
  assert [r["devices"] for r in rows] == [1, 2] and [r["global_batch"] for r in rows] == [4, 8]
  assert all(r["images_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
