"""N local processes of one run, coordinated on localhost: `NPROC=N ./launch.sh CONFIG ...`.

Real multi-process JAX on one machine (CPU collectives via gloo): each child joins through
resnet_jax.distributed. If any child fails, the others are stopped (SIGTERM, then SIGKILL)
and the launcher exits with the failing child's code, so a dead peer never leaves a hang.

The children's stderr passes through the launcher line by line. An error line of ours that
another child already printed is not repeated (every process of a run gets the same config,
so the same verdict on it). Once a child has failed, the runtime's own reports from the
others (C++ log lines, stack dumps of the distributed service) are dropped: each survivor
still says in one line of ours what happened (resnet_jax/distributed.py), and the launcher
says which process failed first -- unless it already said why (exit 2, bad input: the
others end the same way, on their own).

  python -m resnet_jax.local_launcher --nproc 2 -- --config=configs/x.py [...]
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 10
PEER_LOST_EXIT = 4   # resnet_jax/distributed.py's (not imported: it would import JAX here)
# What the XLA/TSL runtime prints when a peer is gone: glog-style lines (E1202 17:03:28...),
# stack frames, and the lines its fatal-error report continues with.
_RUNTIME_NOISE = re.compile(
    r"^([EFW]\d{4} \d\d:\d\d:\d\d|\s+@\s+0x|\*\*\* Check failure|Additional GRPC error|"
    r":UNKNOWN:|\s*$|terminate called|\s+what\(\):|This suggests that the workers|"
    r"INTERNAL: |UNAVAILABLE: |The tasks have crashed|\d+$|RPC: /)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Relay:
  """Copies each child's stderr to ours; after a failure, without the runtime's noise."""

  def __init__(self):
    self.failed = threading.Event()
    self.said = set()           # our error lines already shown
    self._lock = threading.Lock()
    self._threads = []

  def follow(self, stream):
    thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
    thread.start()
    self._threads.append(thread)

  def _copy(self, stream):
    for line in iter(stream.readline, ""):
      if self.failed.is_set() and _RUNTIME_NOISE.match(line):
        continue
      with self._lock:
        if line.startswith("resnet_jax: error: "):
          if line in self.said:
            continue
          self.said.add(line)
        sys.stderr.write(line)
        sys.stderr.flush()

  def say(self, line: str):
    with self._lock:
      print(line, file=sys.stderr, flush=True)

  def drain(self, timeout: float = 5.0):
    for thread in self._threads:
      thread.join(timeout)


def launch(nproc: int, args: list[str], *, env=None) -> int:
  port = _free_port()
  relay = _Relay()
  procs = []
  for i in range(nproc):
    child_env = dict(os.environ if env is None else env,
                     RESNET_JAX_COORDINATOR=f"127.0.0.1:{port}",
                     RESNET_JAX_NUM_PROCESSES=str(nproc), RESNET_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-m", "resnet_jax", *args], env=child_env,
                                  stderr=subprocess.PIPE, text=True, errors="replace"))
    relay.follow(procs[-1].stderr)

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
  while True:
    # After a forwarded signal the children save and exit with 128+signal on their own (all
    # at the same step): that is the expected ending, not a failure to react to.
    ended = [(i, p.poll()) for i, p in enumerate(procs)]
    failures = [(i, code) for i, code in ended if code not in (None, 0)
                and not (forwarded and code == 128 + forwarded[0])]
    if failures and failed is None:
      # A survivor that saw its peer die exits at once (PEER_LOST_EXIT), often within the
      # same poll: the process that failed first is the one that did not just lose a peer.
      i, code = next((f for f in failures if f[1] != PEER_LOST_EXIT), failures[0])
      failed = (i, code)
      relay.failed.set()
      deadline = time.time() + GRACE_S
      if code == 2:
        # Bad input: every process stops with the same line; let them, then make sure.
        while time.time() < deadline and any(q.poll() is None for q in procs):
          time.sleep(0.1)
        relay.drain(1.0)
      if code != 2 or not relay.said:
        reason = (f"killed by {signal.Signals(-code).name}" if code < 0
                  else f"exit code {code}")
        relay.say(f"resnet_jax.local_launcher: process {i} of {nproc} ended ({reason}); "
                  "stopping the others")
      for q in procs:
        if q.poll() is None:
          q.terminate()
      while time.time() < deadline and any(q.poll() is None for q in procs):
        time.sleep(0.1)
      for q in procs:
        if q.poll() is None:
          q.kill()
    if all(code is not None for _, code in ended):
      break
    time.sleep(0.1)
  relay.drain()
  if failed is None:   # all succeeded, or all saved and stopped on a forwarded signal
    return next((p.returncode for p in procs if p.returncode != 0), 0)
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
