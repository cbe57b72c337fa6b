"""N local processes of one run, coordinated on localhost: `NPROC=N ./launch.sh CONFIG ...`.

Real multi-process JAX on one machine (CPU collectives via gloo): each child joins through
resnet_jax.distributed. If any child fails, the others are stopped (SIGTERM, then SIGKILL)
and the launcher exits with the failing child's code, so a dead peer never leaves a hang.

  python -m resnet_jax.local_launcher --nproc 2 -- --config=configs/x.py [...]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(nproc: int, args: list[str], *, env=None) -> int:
  port = _free_port()
  procs = []
  for i in range(nproc):
    child_env = dict(os.environ if env is None else env,
                     RESNET_JAX_COORDINATOR=f"127.0.0.1:{port}",
                     RESNET_JAX_NUM_PROCESSES=str(nproc), RESNET_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-m", "resnet_jax", *args], env=child_env))

  forwarded = []

  def forward(signum, frame):  # preemption of the launcher = preemption of every child
    del frame
    forwarded.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)

  failed = None
  while any(p.poll() is None for p in procs):
    for i, p in enumerate(procs):
      code = p.poll()
      # After a forwarded signal the children save and exit with 128+signal on their own
      # (all at the same step): that is the expected ending, not a failure to react to.
      expected = forwarded and code == 128 + forwarded[0]
      if code not in (None, 0) and failed is None and not expected:
        failed = (i, code)
        reason = (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
        print(f"resnet_jax.local_launcher: process {i} of {nproc} ended ({reason}); "
              "stopping the others", file=sys.stderr, flush=True)
        deadline = time.time() + GRACE_S
        for q in procs:
          if q.poll() is None:
            q.terminate()
        while time.time() < deadline and any(q.poll() is None for q in procs):
          time.sleep(0.1)
        for q in procs:
          if q.poll() is None:
            q.kill()
    time.sleep(0.1)
  if failed is None:
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0)
  code = failed[1]
  return 128 - code if code < 0 else code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--nproc", type=int, required=True)
  parser.add_argument("args", nargs=argparse.REMAINDER)
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  if ns.nproc < 1:
    print(f"resnet_jax.local_launcher: error: --nproc={ns.nproc}: expected >= 1",
          file=sys.stderr)
    return 2
  return launch(ns.nproc, args)


if __name__ == "__main__":
  sys.exit(main())
