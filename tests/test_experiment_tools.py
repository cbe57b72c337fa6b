"""The tools of the plain-vs-residual experiments: the gradient probe (its norms against a
hand-written jax.grad; plain-20 vs ResNet-20 on real digits), the curve plotter (a PNG and
a CSV from a real short run), and experiments/degradation/run.py end to end on the smallest
nets with real CIFAR-10 images (skipped without ../shared/data/cifar10_jpeg)."""

import collections
import csv
import json
import os
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resnet_jax import config_cli, gradients
from resnet_jax.training import setup

from conftest import DEFAULT_CONFIG, REPO, SHARED_DATA, cli_env, run_cli


def _config(data_dir, **overrides):
  config, _ = config_cli.resolve(DEFAULT_CONFIG, {"data.data_dir": data_dir, **overrides})
  return config


def test_probe_norms_equal_a_hand_written_gradient_per_layer(data_dir):
  """resnet8 on two real digit batches: every conv/dense kernel, in forward order, with the
  norm of jax.grad of the smoothed cross-entropy computed here without the probe's code."""
  config = _config(data_dir, **{"model.name": "resnet8", "optimizer.label_smoothing": "0.1",
                                "lowering": "native"})
  data = setup.prepare_data(config)
  run = setup.build(config, data.inputs)
  state = run.init_state()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
              "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(2)]
  probed = gradients.layer_gradient_norms(run, variables, batches)["layers"]

  def loss(params, batch):
    images = (batch["image"].astype(np.float32) - np.float32(78.0)) / np.float32(96.0)
    logits, _ = run.model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                images, train=True, mutable=["batch_stats"])
    targets = 0.9 * jax.nn.one_hot(batch["label"], 10) + 0.01
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))

  expected_order = ["stem_conv"] + [f"stage{s}_block1/conv{c}" for s in (1, 2, 3)
                                    for c in (1, 2)] + ["head"]
  assert [name for name, _ in probed] == expected_order
  for b, batch in enumerate(batches):
    grads = traverse_util.flatten_dict(jax.grad(loss)(variables["params"], batch))
    for name, norms in probed:
      kernel = grads[tuple(name.split("/")) + ("kernel",)]
      np.testing.assert_allclose(norms[b], float(jnp.linalg.norm(kernel.ravel())),
                                 rtol=2e-5, err_msg=name)


def test_probe_command_compares_plain20_and_resnet20_on_real_batches(data_dir, tmp_path):
  results = {}
  for model in ("plain20", "resnet20"):
    out = tmp_path / f"{model}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_jax.gradients", "--model", model, "--batches", "2",
         f"--config.data.data_dir={data_dir}", f"--json={out}",
         f"--plot={tmp_path / model}.png"],
        cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[model] = json.loads(out.read_text())
    assert (tmp_path / f"{model}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "first / last conv:" in proc.stdout
  for model, r in results.items():
    layers = [row["layer"] for row in r["layers"]]
    # the stem, 18 convs of 9 blocks, the classifier: option-A shortcuts have no convs
    assert len(layers) == 20 and layers[0] == "stem_conv" and layers[-1] == "head", layers
    assert r["step"] == 0 and r["batches"] == 2 and all(
        row["norm"] > 0 and np.isfinite(row["norm"]) for row in r["layers"])
    assert r["first_to_last_ratio"] == pytest.approx(r["first_norm"] / r["last_conv_norm"])
  # Same init (same seed, same shapes), same batches: only the shortcuts differ, and they
  # change every gradient below the top block.
  assert results["plain20"]["head_norm"] != results["resnet20"]["head_norm"]


def test_plot_writes_a_png_and_the_csv_of_a_real_run(data_dir, tmp_path):
  workdirs = []
  for model in ("resnet8", "plain8"):
    workdir = tmp_path / model
    proc = run_cli([f"--config={DEFAULT_CONFIG}", f"--config.data.data_dir={data_dir}",
                    f"--config.model.name={model}", "--config.num_train_steps=12",
                    "--config.log_every_steps=4", "--config.eval_every_epochs=0.25",
                    f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdirs.append(str(workdir))
  out = tmp_path / "curves.png"
  proc = subprocess.run([sys.executable, "-m", "resnet_jax.plot", *workdirs, "--out", str(out)],
                        cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
  rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
  logged = [json.loads(l) for l in open(tmp_path / "resnet8" / "metrics.jsonl")]
  train = [(r["step"], 100 * (1 - r["accuracy"])) for r in logged if r["split"] == "train"]
  written = [(int(r["step"]), float(r["error_percent"])) for r in rows
             if r["run"] == "resnet8" and r["split"] == "train"]
  assert [s for s, _ in written] == [s for s, _ in train]
  np.testing.assert_allclose([e for _, e in written], [e for _, e in train], atol=1e-4)
  assert [r["step"] for r in logged if r["split"] == "train"] == [4, 8, 12]
  tests = [r for r in rows if r["split"] == "test"]
  assert {r["run"] for r in tests} == {"resnet8", "plain8"} and len(tests) == 2 * 2
  bad = subprocess.run([sys.executable, "-m", "resnet_jax.plot", str(tmp_path / "nowhere"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no metrics.jsonl" in bad.stderr


def _small_cifar(root, per_class):
  """A few real CIFAR-10 images per class, from the shared JPEG copy's archives."""
  for split, count in per_class.items():
    seen = collections.Counter()
    with tarfile.open(os.path.join(SHARED_DATA, "cifar10_jpeg", f"{split}.tar")) as tar:
      for member in tar:
        parts = member.name.split("/")
        if not member.isfile() or len(parts) < 2 or seen[parts[-2]] >= count:
          continue
        seen[parts[-2]] += 1
        (root / split / parts[-2]).mkdir(parents=True, exist_ok=True)
        (root / split / parts[-2] / parts[-1]).write_bytes(tar.extractfile(member).read())
        if len(seen) == 10 and min(seen.values()) >= count:
          break


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "cifar10_jpeg", "train.tar")),
                    reason="../shared/data/cifar10_jpeg not present")
def test_the_degradation_experiment_command_runs_end_to_end(tmp_path):
  images = tmp_path / "cifar_small"
  _small_cifar(images, {"train": 13, "test": 3})     # 130 train: one batch of 128
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "degradation", "run.py"),
       "--models", "plain8,resnet8", "--budget", "4", "--data", "jpeg",
       "--image-folder", str(images), "--data-dir", str(tmp_path / "tfds"),
       "--runs", str(tmp_path / "runs"), "--out", str(out), "--probe-batches", "1"],
      cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("plain.png", "resnet.png", "gradients.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  summary = json.loads((out / "results.json").read_text())
  assert [r["model"] for r in summary["rows"]] == ["plain8", "resnet8"]
  assert summary["decay_steps"] == [2, 3] and summary["data"] == "jpeg"
  for row in summary["rows"]:
    assert row["steps"] == 4 and 0 <= row["test_error"] <= 100
    for when in ("init", "trained"):
      assert row["gradients"][when]["first_norm"] > 0
  table = (out / "results.md").read_text()
  assert "| plain8 |" in table and "| resnet8 |" in table and "Command: `" in table


def test_table6_step_times_projects_the_schedule_from_the_benchmarks_step(tmp_path):
  """experiments/degradation/table6_step_times.py on two small nets: one row each, whose
  projected hours are --iterations x the benchmark's median step; a wrong name is one line."""
  script = os.path.join(REPO, "experiments", "degradation", "table6_step_times.py")
  out = tmp_path / "t6.md"
  proc = subprocess.run(
      [sys.executable, script, "--nets", "resnet8,plain8", "--batch", "4", "--steps", "2",
       "--warmup", "1", "--iterations", "3600000", "--out", str(out)],
      cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
          if line.startswith("| resnet8 ") or line.startswith("| plain8 ")]
  assert [r[0].strip() for r in rows] == ["resnet8", "plain8"]
  for _, ms, _, _, hours in rows:
    # 3.6e6 iterations x (ms / 1000) s / 3600 s = ms hours.
    assert float(hours) == pytest.approx(float(ms), abs=0.011)
  assert "cpu (cpu), jax " in out.read_text()
  bad = subprocess.run([sys.executable, script, "--nets", "resnet21", "--steps", "1"],
                       cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "table6_step_times: the benchmark failed for resnet21: benchmark: error: unknown model "
      "'resnet21'"), bad.stderr
