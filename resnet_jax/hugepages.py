"""Transparent huge pages for the buffers XLA:CPU allocates on every step.

XLA:CPU mallocs each step's large buffers (activations and their gradients: hundreds of MB),
and glibc serves blocks that big with a fresh mmap(): every step faults in and zeroes each
4 KiB page again. Measured on a CIFAR ResNet-20 step (batch 128, 2 cores): ~73,000 page
faults per step. glibc >= 2.35 can back its allocations with transparent huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1): 512x fewer faults and TLB misses, and that step
went from ~270 to ~195 ms (experiments/performance.md). PyTorch's step, same machine, did
not change beyond noise.

glibc reads tunables only when a process starts. So launch.sh exports the tunable, and the
command-line entry points (`python -m resnet_jax`, `python -m resnet_jax.benchmark`)
re-execute themselves once with it (same PID, same arguments) when it is missing.
RESNET_JAX_HUGEPAGES=0 turns both off.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
  """Linux with glibc, and a kernel whose transparent huge pages are not switched off."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(_THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def enabled(env=None) -> bool:
  """Whether this process (or `env`) runs with the tunable."""
  env = os.environ if env is None else env
  return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def with_tunable(env) -> dict:
  """A copy of `env` whose GLIBC_TUNABLES also asks for huge pages (other tunables kept)."""
  env = dict(env)
  if not enabled(env):
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
  return env


def reexec_if_missing() -> None:
  """First thing under `if __name__ == "__main__"`: restart this command with the tunable
  when it would take effect and is not set. Never call it from library code (it replaces
  the running process)."""
  if os.environ.get("RESNET_JAX_HUGEPAGES", "1") == "0" or enabled() or not supported():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], with_tunable(os.environ))
