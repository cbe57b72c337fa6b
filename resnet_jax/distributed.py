"""Joining a multi-process run: explicit coordinator, or detected on SLURM / TPU / GKE.

Environment (set by `NPROC=N ./launch.sh`, or by you):
  RESNET_JAX_COORDINATOR=host:port  RESNET_JAX_NUM_PROCESSES=N  RESNET_JAX_PROCESS_ID=i
Otherwise, under SLURM with more than one task, or with RESNET_JAX_DISTRIBUTED=auto (TPU
pods, GKE), jax.distributed.initialize() detects the cluster itself. Nothing set: one process.
"""

import os

import jax

# A dead peer must end the run quickly rather than hang in a collective: JAX's coordination
# service reports missing heartbeats after this long (its default is 100 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


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
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("RESNET_JAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    return True
  return False
