"""Kill, preempt, corrupt, diverge: the run resumes as the same run or stops cleanly."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax.config_schema import base_config
from resnet_jax.training import checkpoints as ckpt_lib
from resnet_jax.training.checkpoints import Checkpoints

from conftest import REPO, cli_env, logged_step, read_checkpoint, read_metrics, run_cli

STEPS = 40  # 22 steps/epoch at batch 64: kills land in epoch 1 and mid-epoch 2


def _args(data_dir, workdir, *extra):
  return ["--config=configs/digits_resnet20.py", f"--config.data.data_dir={data_dir}",
          "--config.model.name=resnet8", f"--config.num_train_steps={STEPS}",
          "--config.log_every_steps=1", "--config.checkpoint.every_steps=5",
          "--config.eval_every_epochs=100", f"--workdir={workdir}", *extra]


def _popen(args, devices=1):
  return subprocess.Popen([sys.executable, "-m", "resnet_jax", *args], cwd=REPO,
                          env=cli_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_until(predicate, proc, timeout=1800):
  """Until `predicate()` or `proc` ends; `timeout` only catches a hang (a loaded machine is
  slow, not this slow)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.01)
  return False


def _final_state(workdir, step=STEPS):
  return read_checkpoint(workdir, step)


@pytest.fixture(scope="module")
def reference_dir(data_dir, tmp_path_factory):
  """An uninterrupted run on 1 device, every 5th step's checkpoint kept."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run_cli(_args(data_dir, workdir, "--config.checkpoint.keep=10"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


@pytest.fixture(scope="module")
def reference(reference_dir):
  return _final_state(reference_dir)


def _assert_same_params(a, b):
  for key in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, a[key], b[key])


@pytest.mark.parametrize("kill", ["step7", "step27_mid_epoch", "during_async_save"])
def test_sigkill_then_rerun_is_bitwise_identical(kill, data_dir, tmp_path, reference):
  workdir = str(tmp_path)
  proc = _popen(_args(data_dir, workdir))
  if kill == "during_async_save":
    # Kill the moment Orbax has a save in flight (its temporary folder exists), past step 10.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    hit = _wait_until(lambda: logged_step(workdir) >= 10 and
                      glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*")), proc)
  else:
    target = int(kill[4:].split("_")[0])
    hit = _wait_until(lambda: logged_step(workdir) >= target, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert hit, "the run ended before the kill point"
  killed_at = logged_step(workdir)
  assert killed_at < STEPS
  rerun = run_cli(_args(data_dir, workdir))
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "resumed from" in rerun.stdout or killed_at < 5
  _assert_same_params(_final_state(workdir), reference)


def test_sigterm_saves_the_current_step_and_exits_143(data_dir, tmp_path, reference):
  workdir = str(tmp_path)
  proc = _popen(_args(data_dir, workdir))
  assert _wait_until(lambda: logged_step(workdir) >= 8, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  line = stderr.strip().splitlines()[-1]
  assert "preempted by SIGTERM at step" in line and "run the same command" in line
  saved = int(line.split("at step ")[1].split(":")[0])
  assert saved in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))]
  rerun = run_cli(_args(data_dir, workdir))
  assert rerun.returncode == 0 and f"resumed from {workdir}/checkpoints/{saved}" in rerun.stdout
  _assert_same_params(_final_state(workdir), reference)


def test_truncated_latest_checkpoint_falls_back_to_previous(data_dir, tmp_path, reference):
  workdir = str(tmp_path)
  proc = run_cli(_args(data_dir, workdir, "--config.stop_after_steps=15"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  state_files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", "15", "state", "**"),
                                      recursive=True)
                 if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  victim = max(state_files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  rerun = run_cli(_args(data_dir, workdir))
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "checkpoint step 15 is unreadable" in rerun.stdout
  assert "resumed from" in rerun.stdout and "/checkpoints/10" in rerun.stdout
  assert glob.glob(os.path.join(workdir, "checkpoints_corrupt", "15-*")), "kept, not deleted"
  _assert_same_params(_final_state(workdir), reference)


def test_nan_stops_with_step_and_quantity_and_saves_nothing_bad(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = run_cli(_args(data_dir, workdir, "--config.optimizer.learning_rate=1e30",
                       "--config.checkpoint.every_steps=1"))
  assert proc.returncode == 3
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("resnet_jax: error: non-finite ") and " at step " in line
  assert "param_norm" in line or "loss" in line or "grad_norm" in line
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  try:
    steps = ckpts.all_steps()
    assert steps, "the steps before the divergence are saved"
    for step in steps:
      assert ckpt_lib.all_finite(ckpts.read(step)), f"checkpoint {step} has NaN/Inf"
  finally:
    ckpts.close()


def test_nan_skip_policy_counts_skipped_steps(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = run_cli(_args(data_dir, workdir, "--config.optimizer.learning_rate=1e30",
                       "--config.nan_policy=skip", "--config.num_train_steps=6",
                       "--config.schedule.warmup_epochs=0"))  # warmup would start at lr 0
  assert proc.returncode == 0, proc.stderr[-2000:]
  last = read_metrics(workdir)[-1]
  assert last["step"] == 6 and last["skipped_steps"] == 6   # every update overflows
  assert ckpt_lib.all_finite(_final_state(workdir, 6))


def test_best_checkpoint_and_metadata(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = run_cli(["--config=configs/digits_resnet20.py", f"--config.data.data_dir={data_dir}",
                  "--config.model.name=resnet8", "--config.num_epochs=4",
                  "--config.eval_every_epochs=1", "--config.checkpoint.keep=2",
                  "--config.checkpoint.every_steps=11", f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  evals = read_metrics(workdir, "eval")
  assert [e["step"] for e in evals] == [22, 44, 66, 88]
  best_step = max(evals, key=lambda e: (e["top1"], -e["step"]))["step"]
  assert os.listdir(os.path.join(workdir, "checkpoints_best")) == [str(best_step)]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [77, 88]
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  try:
    meta = ckpts.read_meta(88)
  finally:
    ckpts.close()
  assert meta["step"] == 88 and meta["model"] == "resnet8" and meta["code_version"]
  assert meta["config"]["model"]["name"] == "resnet8" and "loss" in meta["metrics"]


@pytest.mark.parametrize("saved_on,resumed_on", [(8, 1), (1, 4)])
def test_topology_change_restores_and_continues(saved_on, resumed_on, data_dir, tmp_path,
                                                reference_dir):
  """Same process count, different device count: the data order is identical, so the run
  matches the 1-device reference up to float reduction order, at the save and 5 steps after
  the resume on the new topology.

  Why not at the end: this recipe is chaotic around steps 20-40 (the warm-up peak).
  Measured, two uninterrupted runs on 1 and on 8 devices agree to 5e-7 at step 20 and differ
  by 20% at step 40, so any comparison there tests luck, not the restore."""
  workdir = str(tmp_path)
  first = run_cli(_args(data_dir, workdir, "--config.stop_after_steps=20"), devices=saved_on)
  assert first.returncode == 0, first.stderr[-2000:]
  second = run_cli(_args(data_dir, workdir, "--config.stop_after_steps=25"), devices=resumed_on)
  assert second.returncode == 0, second.stderr[-2000:]
  assert f"{resumed_on} devices" in second.stdout and "checkpoints/20" in second.stdout
  for step, rtol in ((20, 1e-5), (25, 2e-3)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=2e-5),
                 _final_state(workdir, step)["params"],
                 _final_state(reference_dir, step)["params"])
