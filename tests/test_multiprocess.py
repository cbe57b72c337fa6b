"""Real multi-process JAX on one machine: 2 processes x 2 CPU devices, gloo collectives."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import REPO, cli_env, logged_step, read_checkpoint, read_metrics, run_cli

STEPS = 12


def _args(data_dir, workdir, *extra):
  return ["--config=configs/digits_resnet20.py", f"--config.data.data_dir={data_dir}",
          "--config.model.name=resnet8", f"--config.num_train_steps={STEPS}",
          "--config.log_every_steps=1", "--config.data.batch_size=64",
          "--config.checkpoint.every_steps=100", "--config.eval_every_epochs=100",
          f"--workdir={workdir}", *extra]


def _launcher_cmd(nproc, args):
  """`NPROC=n ./launch.sh` when this interpreter is the launcher's venv (as in CI), else the
  module launch.sh execs (same code path, minus the venv check)."""
  venv = sys.prefix
  if any(f.startswith(".resnet_jax-") for f in os.listdir(venv)):
    return ([os.path.join(REPO, "launch.sh"), args[0].split("=", 1)[1], *args[1:]],
            {"NPROC": str(nproc), "RESNET_JAX_VENV": venv})
  return [sys.executable, "-m", "resnet_jax.local_launcher", "--nproc", str(nproc), "--",
          *args], {}


def _launch(nproc, args, devices_per_process=2, **kw):
  cmd, extra_env = _launcher_cmd(nproc, args)
  return subprocess.Popen(cmd, cwd=REPO, env=cli_env(devices_per_process, **extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_one_device_eight_devices_and_two_processes_agree(data_dir, tmp_path):
  """Same global batch (64) and seed. Every process walks the same global example order and
  keeps its slice of each batch, and BN normalises over the global batch, so the three runs
  differ only in float reduction order: rtol 1e-4 on 12 losses, 1e-3 on params."""
  losses, params = {}, {}
  for name, devices in (("1dev", 1), ("8dev", 8)):
    workdir = str(tmp_path / name)
    proc = run_cli(_args(data_dir, workdir), devices=devices)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses[name] = [m["loss"] for m in read_metrics(workdir)]
    params[name] = read_checkpoint(workdir, STEPS)["params"]
  workdir = str(tmp_path / "2proc")
  proc = _launch(2, _args(data_dir, workdir))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "4 devices on 2 process(es)" in out
  losses["2proc"] = [m["loss"] for m in read_metrics(workdir)]
  params["2proc"] = read_checkpoint(workdir, STEPS)["params"]
  assert len(losses["1dev"]) == STEPS and losses["1dev"][0] != losses["1dev"][-1]
  for name in ("8dev", "2proc"):
    np.testing.assert_allclose(losses[name], losses["1dev"], rtol=1e-4, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 params[name], params["1dev"])


def test_killing_one_process_ends_the_other_within_60s(data_dir, tmp_path):
  """No launcher watching: JAX's coordination service notices the missing heartbeat."""
  workdir = str(tmp_path)
  port = 20000 + os.getpid() % 20000
  args = [sys.executable, "-m", "resnet_jax",
          *_args(data_dir, workdir, "--config.num_train_steps=100000")]
  procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True,
                            env=cli_env(2, RESNET_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                        RESNET_JAX_NUM_PROCESSES="2",
                                        RESNET_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    deadline = time.time() + 240
    while logged_step(workdir) < 5:
      assert time.time() < deadline and procs[0].poll() is None, "run did not start"
      time.sleep(0.2)
    procs[1].kill()
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=90)
    elapsed = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode != 0
  assert elapsed < 60, f"survivor took {elapsed:.0f}s"
  # The coordination service words this differently depending on which side notices first
  # ("Task 1 heartbeat timeout", "stopped sending heartbeats", "has failed"); all of them
  # say the survivor died because its peer vanished, not of something unrelated.
  assert re.search(r"heartbeat|has failed|unhealthy", err), err[-2000:]


def test_launcher_stops_the_others_when_one_dies(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = _launch(2, _args(data_dir, workdir, "--config.num_train_steps=100000"))
  try:
    deadline = time.time() + 240
    while logged_step(workdir) < 3:
      assert time.time() < deadline and proc.poll() is None, "run did not start"
      time.sleep(0.2)
    children = _python_children(proc.pid)
    assert len(children) == 2, children
    os.kill(children[1], signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=90)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode != 0 and time.time() - killed_at < 60
  assert "process 1 of 2 ended (killed by SIGKILL); stopping the others" in err


def _python_children(pid):
  """PIDs of the resnet_jax processes below `pid` (launch.sh execs into the launcher)."""
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{entry}/cmdline") as f:
          cmd = f.read()
      except OSError:
        continue
      if ppid == pid and "resnet_jax" in cmd and "local_launcher" not in cmd:
        found.append(int(entry))
  return sorted(found, key=lambda p: open(f"/proc/{p}/environ").read().find(
      "RESNET_JAX_PROCESS_ID=1") >= 0)


def test_sigterm_saves_the_same_step_on_all_processes_and_resumes_on_one(data_dir, tmp_path):
  """Preemption sync point: both processes save one step; the run then continues as a single
  process (a process-count change) and ends where a single-process run ends."""
  workdir = str(tmp_path / "run")
  long_args = _args(data_dir, workdir, "--config.num_train_steps=40")
  proc = _launch(2, long_args)
  deadline = time.time() + 240
  while logged_step(workdir) < 5:
    assert time.time() < deadline and proc.poll() is None, "run did not start"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  stopped_at = max(saved)
  assert 5 <= stopped_at < 40 and "preempted by SIGTERM at step" in err
  assert "stopping the others" not in err    # a clean preemption is not a failure
  resumed = run_cli(long_args, devices=1)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"checkpoints/{stopped_at}" in resumed.stdout
  reference = str(tmp_path / "reference")
  ref = run_cli(_args(data_dir, reference, "--config.num_train_steps=40"), devices=1)
  assert ref.returncode == 0
  # Same batches whatever the process count; only float reduction order differs. Up to the
  # preemption the 2-process losses match the 1-process reference to 1e-4, and for the next
  # 10 steps to 1e-3. Later, SGD at the peak of warmup amplifies float noise chaotically
  # (measured 0.568 vs 0.573 and 0.509 vs 0.525 at steps 40/39 in two runs), so the end is
  # only held to 5e-2 -- an unrelated run (other seed) differs by far more.
  run = {m["step"]: m["loss"] for m in read_metrics(workdir)}
  ref = {m["step"]: m["loss"] for m in read_metrics(reference)}
  assert sorted(run) == sorted(ref) == list(range(1, 41))
  for last, rtol in ((stopped_at, 1e-4), (stopped_at + 10, 1e-3), (40, 5e-2)):
    steps_ = [s for s in ref if s <= last]
    np.testing.assert_allclose([run[s] for s in steps_], [ref[s] for s in steps_], rtol=rtol,
                               err_msg=f"steps up to {last}")
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["step"] == 40
