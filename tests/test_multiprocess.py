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


# A safety net, not a deadline: how long a wait may take before the test gives up on a run
# that will never get there (a hang). Loaded machines are slow, not this slow.
HANG_CAP_S = 1800


def _wait_until(condition, procs, what):
  """Wait for `condition()` while every process in `procs` is alive."""
  started = time.time()
  while not condition():
    dead = [p.returncode for p in procs if p.poll() is not None]
    assert not dead, f"{what}: a process ended first (exit {dead})"
    assert time.time() - started < HANG_CAP_S, f"{what}: nothing after {HANG_CAP_S} s"
    time.sleep(0.2)


# What the XLA runtime prints when a peer is gone, and must not reach the user.
_RUNTIME_NOISE = re.compile(r"^([EF]\d{4} |\s+@\s+0x|\*\*\* Check failure|Traceback)", re.M)


def test_killing_one_process_ends_the_other_with_one_line(data_dir, tmp_path):
  """No launcher watching: the survivor sees the dead peer's connection close
  (resnet_jax/peer_watch.py), or its collective fail first, and ends with one line of ours
  naming itself, what happened and its exit code -- not a traceback and an abort at the
  runtime's exit barrier. A failed collective's traceback is kept in the workdir."""
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
    _wait_until(lambda: logged_step(workdir) >= 5, procs, "training to start")
    procs[1].kill()
    _, err = procs[0].communicate(timeout=HANG_CAP_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode == 4, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith("resnet_jax: error: process 0 of 2: another process of the run "
                             "is gone (") and lines[0].endswith("; exit 4"), lines
  if "connection closed without a goodbye" not in lines[0]:     # the collective's path
    assert f"details in {workdir}/failure_process0.txt" in lines[0]
    assert "Traceback" in open(os.path.join(workdir, "failure_process0.txt")).read()


def test_launcher_stops_the_others_when_one_dies_with_a_line_from_each(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = _launch(2, _args(data_dir, workdir, "--config.num_train_steps=100000"))
  try:
    _wait_until(lambda: logged_step(workdir) >= 3, [proc], "training to start")
    children = _python_children(proc.pid)
    assert len(children) == 2, children
    os.kill(children[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=HANG_CAP_S)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 137, err[-3000:]      # the failing child's: killed by SIGKILL
  assert "process 1 of 2 ended (killed by SIGKILL); stopping the others" in err
  assert "resnet_jax: error: process 0 of 2: another process of the run is gone" in err
  assert not _RUNTIME_NOISE.search(err), err[-3000:]
  assert len(err.strip().splitlines()) <= 3, err[-3000:]


def test_a_bad_config_in_every_process_is_one_line(tmp_path):
  proc = _launch(2, ["--config=configs/digits_resnet20.py", "--config.seed=-1",
                     f"--workdir={tmp_path}/w"])
  _, err = proc.communicate(timeout=HANG_CAP_S)
  assert proc.returncode == 2
  assert err.strip().splitlines() == [
      "resnet_jax: error: config key 'seed'=-1: expected an int in [0, 2^31)"], err


def _stop_on_stderr_line(args, marker, *, then_wait_s=0.0):
  """Run `python -m resnet_jax ARGS` logging jax's compiles, SIGTERM it `then_wait_s` after
  a stderr line contains `marker`; (exit code, stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", "resnet_jax", *args], cwd=REPO,
                          # Compiles for real (the suite's persistent cache would make
                          # them instant): the signal is aimed at one.
                          env=cli_env(1, JAX_LOG_COMPILES="1",
                                      JAX_ENABLE_COMPILATION_CACHE="false"),
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if marker in line:
      break
  assert marker in seen[-1], "".join(seen)[-3000:]
  time.sleep(then_wait_s)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=HANG_CAP_S)
  return proc.returncode, "".join(seen) + err


def _ours(err):
  return [line for line in err.splitlines() if line.startswith("resnet_jax")]


def test_sigterm_during_start_up_is_143_and_a_line(data_dir, tmp_path):
  """Before the training loop (whose SIGTERM saves first) a SIGTERM still ends the run
  with 128 + 15 and one line saying nothing was lost; the fresh workdir is not left behind.
  The signal is sent half a second into XLA's compile of the state's initialisation (2 s on
  2 cores): it finds jax compiling in a thread of its own, and the exit must not crash on that
  (it segfaulted, or printed Orbax's "cannot schedule new futures after shutdown", in 10 of
  12 SIGTERMs sent 0.1-1.5 s into start-up before main._exit_now). Sent at another moment
  the outcome must be the same: the wait only aims at the hardest one."""
  workdir = tmp_path / "w"
  code, err = _stop_on_stderr_line(_args(data_dir, str(workdir)),
                                   "MLIR module conversion jit(init)", then_wait_s=0.5)
  assert code == 143, err[-3000:]
  ours = "resnet_jax: stopped by SIGTERM outside the training loop; nothing was saved (exit 143)"
  assert err.strip().splitlines()[-1] == ours and _ours(err) == [ours], err[-3000:]
  assert not workdir.exists()


def test_sigterm_before_an_evaluation_keeps_the_run(data_dir, tmp_path):
  """eval_only on a trained workdir, stopped before it evaluates: the line says the
  checkpoint is kept, and it is, with the run's config."""
  workdir = tmp_path / "w"
  done = run_cli(_args(data_dir, str(workdir)))
  assert done.returncode == 0, done.stderr[-3000:]
  saved = sorted(os.listdir(workdir / "checkpoints"))
  assert str(STEPS) in saved, saved
  code, err = _stop_on_stderr_line(_args(data_dir, str(workdir), "--config.eval_only=true"),
                                   "MLIR module conversion jit(eval_step)", then_wait_s=0.3)
  assert code == 143, err[-3000:]
  ours = ("resnet_jax: stopped by SIGTERM outside the training loop; the newest checkpoint in "
          f"{workdir} is kept (exit 143)")
  assert err.strip().splitlines()[-1] == ours and _ours(err) == [ours], err[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == saved
  assert (workdir / "config.json").exists() and (workdir / "results.json").exists()


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
  _wait_until(lambda: logged_step(workdir) >= 5, [proc], "training to start")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=HANG_CAP_S)
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
