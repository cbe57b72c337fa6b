"""Compile a native helper once per machine into a shared cache, safely under concurrency.

Used by the CPU kernels (`kernels/library.py`) and the big-buffer reuse library
(`allocator.py`). Standard library only: allocator.py runs before anything else is imported.
"""

import fcntl
import os
import subprocess
from pathlib import Path


def cache_dir() -> Path:
  """$RESNET_JAX_KERNEL_CACHE, else ~/.cache/resnet_jax/cpu_kernels (or under $XDG_CACHE_HOME)."""
  if os.environ.get("RESNET_JAX_KERNEL_CACHE"):
    return Path(os.environ["RESNET_JAX_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return Path(base) / "resnet_jax" / "cpu_kernels"


def compile_once(target: Path, command, what: str, error: type[Exception]) -> Path:
  """`target`, compiled now by `command(output_path)` (an argv) unless the cache has it.
  Concurrent processes wait on a lock file instead of compiling twice, and the file appears
  atomically. Failures raise `error` with one line: `what` failed and the compiler's first
  error lines, or the cache that could not be written."""
  if target.exists():
    return target
  cache = target.parent
  try:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)     # another process may be building the same file
      if target.exists():
        return target
      partial = target.with_suffix(f".{os.getpid()}.tmp")
      result = subprocess.run(command(partial), capture_output=True, text=True)
      if result.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = result.stderr.strip().splitlines()
        tail = " | ".join([l for l in lines if "error" in l][:3] or lines[-3:])
        raise error(f"{what} failed: {tail}")
      os.replace(partial, target)          # atomic: readers see a whole file or none
  except OSError as e:
    raise error(f"cannot write the kernel cache {cache}: {e}") from e
  return target
