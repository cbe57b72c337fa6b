"""Joining a multi-process run, and leaving it cleanly when a peer dies.

Environment (set by `NPROC=N ./launch.sh`, or by you):
  RESNET_JAX_COORDINATOR=host:port  RESNET_JAX_NUM_PROCESSES=N  RESNET_JAX_PROCESS_ID=i
Otherwise, under SLURM with more than one task, or with RESNET_JAX_DISTRIBUTED=auto (TPU
pods, GKE), jax.distributed.initialize() detects the cluster itself. Nothing set: one process.

When a process of the run dies, each survivor ends with one line of ours -- which process,
what happened, the exit code (PEER_LOST_EXIT) -- whether a launcher watches or not. Two
paths lead there: peer_watch.py sees the dead process's connections close at once (the
usual one), and `exit_on_peer_failure` catches a collective that fails first ("Gloo
all-reduce failed: Connection closed by peer"). Both leave with os._exit: the runtime's own
shutdown would wait on the dead peer at its exit barrier and abort there with a C++ stack
dump. The Python traceback goes to <workdir>/failure_process<i>.txt, not the terminal. When
process 0 dies it takes the coordination service with it, and the runtime may print its own
lines before ours.

A peer that hangs without dying (its sockets stay open) is found by JAX's coordination
service after RESNET_JAX_HEARTBEAT_TIMEOUT seconds (30); the runtime then ends the
survivors itself, with its own lines ("Terminating process because the JAX distributed
service detected fatal errors"): its callback for that cannot be replaced from Python (the
binding cannot pass the error status to a Python function; tried, it aborts).
"""

import os
import sys
import threading
import traceback

import jax

from resnet_jax import peer_watch

# A dead peer must end the run quickly rather than hang in a collective: JAX's coordination
# service reports missing heartbeats after this long (its default is 100 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
# The exit code of a process that stops because another process of its run failed.
PEER_LOST_EXIT = 4


def initialize_from_env(environ=None) -> bool:
  """Call jax.distributed.initialize when the environment says this is a multi-process run."""
  env = os.environ if environ is None else environ
  heartbeat = int(env.get("RESNET_JAX_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT_S))
  # CPU processes exchange collectives through gloo (GPUs/TPUs use their own fabric).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if "RESNET_JAX_COORDINATOR" in env:
    jax.distributed.initialize(coordinator_address=env["RESNET_JAX_COORDINATOR"],
                               num_processes=int(env["RESNET_JAX_NUM_PROCESSES"]),
                               process_id=int(env["RESNET_JAX_PROCESS_ID"]),
                               heartbeat_timeout_seconds=heartbeat)
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("RESNET_JAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
  else:
    return False
  _watch_peers()
  return True


def _watch_peers() -> None:
  """Notice a dead peer at once (resnet_jax/peer_watch.py)."""
  from jax._src import distributed as jax_distributed
  state = jax_distributed.global_state
  if state.client is None:
    return
  peer_watch.start(state.client, jax.process_index(), jax.process_count(),
                   on_death=lambda peer: leave(
                       f"another process of the run is gone (process {peer}: its "
                       "connection closed without a goodbye)"),
                   coordinator=getattr(state, "coordinator_address", "") or "")


def goodbye() -> None:
  """This process stops on purpose (done, preempted, bad input): tell the others."""
  peer_watch.goodbye()


def _first_line(text) -> str:
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  return lines[0] if lines else ""


_leaving = threading.Lock()


def leave(what: str, *, code: int = PEER_LOST_EXIT, details: str = "",
          workdir: str = "") -> None:
  """Say in one line that this process stops and why, keep `details` (a traceback) in the
  workdir, and exit at once: the runtime's own exit path would wait on the dead peer."""
  if not _leaving.acquire(blocking=False):
    # The peer watch and a failing collective can both get here: one line, not two.
    threading.Event().wait()
  index, count = jax.process_index(), jax.process_count()
  kept = ""
  if details and workdir:
    path = os.path.join(workdir, f"failure_process{index}.txt")
    try:
      with open(path, "w") as f:
        f.write(details)
      kept = f"; details in {path}"
    except OSError:
      pass
  sys.stdout.flush()
  print(f"resnet_jax: error: process {index} of {count}: {what}{kept}; exit {code}",
        file=sys.stderr, flush=True)
  os._exit(code)


# What a collective raises when the process it talks to is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Gloo",
              "heartbeat", "DEADLINE_EXCEEDED", "UNAVAILABLE", "Socket closed",
              "failed to connect")


def exit_on_peer_failure(error: BaseException, workdir: str) -> None:
  """In a multi-process run, an exception that says a peer is gone (or any unexpected one:
  the others will then lose this process) ends this process with one line; single-process
  runs return and raise as usual."""
  if jax.process_count() <= 1:
    return
  message = _first_line(error)
  if any(marker in str(error) for marker in _PEER_GONE):
    what = f"another process of the run is gone ({type(error).__name__}: {message[:300]})"
  else:
    what = f"failed: {type(error).__name__}: {message[:300]}"
  leave(what, code=PEER_LOST_EXIT if "gone" in what else 1,
        details="".join(traceback.format_exception(error)), workdir=workdir)
