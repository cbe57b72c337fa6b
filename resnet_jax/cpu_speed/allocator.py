"""How our processes allocate memory on the host: glibc huge pages, and big-buffer reuse.

XLA:CPU mallocs each step's large buffers (activations, their gradients, one temp buffer
of 0.6 GB for a ResNet-18 step at batch 32) and frees them when the step ends. glibc serves
blocks that big with a fresh mmap() and returns them with munmap(), so every step the kernel
faults in and zeroes all of that memory again. Two remedies, both set up when a process
starts (glibc reads tunables, and the dynamic loader LD_PRELOAD, only then):

- Huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc >= 2.35): one fault per 2 MiB
  instead of per 4 KiB. A CIFAR ResNet-20 step (batch 128, 2 cores) went from ~73,000
  faults and ~270 ms to ~195 ms (experiments/performance.md). RESNET_JAX_HUGEPAGES=0
  turns it off.
- Big-buffer reuse (`buffer_reuse.c`, LD_PRELOAD'ed): a freed block of >= 8 MiB stays
  mapped and serves the next request that fits, so a step faults nothing in. In an
  interleaved A/B a ResNet-18 step (batch 32) went from 2464 to 1937 ms, and its system
  time, the kernel zeroing pages, from 321 to 6 ms per step. RESNET_JAX_BUFFER_REUSE=0
  turns it off; RESNET_JAX_BUFFER_REUSE_MIN_MIB (8) and RESNET_JAX_BUFFER_REUSE_MAX_MIB (a
  quarter of RAM: what may stay cached) tune it.
  It is compiled on first use with the machine's C compiler ($CC, cc or gcc) and cached
  beside the CPU kernels; where that fails, the process runs without it and its start-up
  line says why.

Both help XLA:CPU only, so they are for processes that will run on the CPU backend, decided
before JAX starts (`runs_on_cpu`): JAX_PLATFORMS names only "cpu", or it is unset and no
GPU/TPU plugin is installed (a `jax_plugins` module or entry point -- CUDA, ROCm -- or
libtpu). A GPU or TPU job is never touched. Nor is a user's own LD_PRELOAD (tcmalloc,
jemalloc) overridden: with one set, reuse stays off and the start-up line says so;
RESNET_JAX_BUFFER_REUSE=1 puts ours ahead of it on purpose.

The command-line entry points (`python -m resnet_jax`, `python -m resnet_jax.benchmark`,
the experiments that time steps) call resnet_jax.lowering.prepare_process() first, which
re-executes the process once (same PID, same arguments) with whatever is missing;
`describe()` is the phrase their start-up line prints. This module imports nothing outside
the standard library, so the PyTorch peer script can use it too.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from resnet_jax.cpu_speed import native_build

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_SOURCE = Path(__file__).resolve().parent / "buffer_reuse.c"
_LIBRARY_PREFIX = "resnet_jax_buffer_reuse-"
_CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall")


def _linux_with_glibc() -> bool:
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def supported() -> bool:
  """Linux with glibc, and a kernel whose transparent huge pages are not switched off."""
  if not _linux_with_glibc():
    return False
  try:
    with open(_THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def enabled(env=None) -> bool:
  """Whether this process (or `env`) runs with the huge-page tunable."""
  env = os.environ if env is None else env
  return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def with_tunable(env) -> dict:
  """A copy of `env` whose GLIBC_TUNABLES also asks for huge pages (other tunables kept)."""
  env = dict(env)
  if not enabled(env):
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
  return env


class BufferReuseUnavailable(RuntimeError):
  """Why the buffer-reuse library cannot be built here (one line)."""


def _c_compiler() -> str:
  candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
  for cc in candidates:
    if found := shutil.which(cc):
      return found
  raise BufferReuseUnavailable(f"no C compiler found (looked for {' and '.join(candidates)})")


def buffer_reuse_library() -> Path:
  """The compiled buffer-reuse library, built now (under a lock) if the cache has none."""
  if not _linux_with_glibc():
    raise BufferReuseUnavailable(f"needs Linux with glibc (this is {sys.platform})")
  cc = _c_compiler()
  version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256(_SOURCE.read_bytes() + "\0".join(
      [version, " ".join(_CFLAGS), platform.machine()]).encode()).hexdigest()[:16]
  target = native_build.cache_dir() / f"{_LIBRARY_PREFIX}{key}.so"
  return native_build.compile_once(
      target, lambda out: [cc, *_CFLAGS, str(_SOURCE), "-o", str(out), "-ldl"],
      f"compiling {_SOURCE.name} with {cc}", BufferReuseUnavailable)


def buffer_reuse_preloaded(env=None) -> bool:
  """Whether LD_PRELOAD (of this process, or `env`) names the buffer-reuse library."""
  env = os.environ if env is None else env
  return any(Path(p).name.startswith(_LIBRARY_PREFIX) for p in _preloads(env))


def _preloads(env) -> list[str]:
  return env.get("LD_PRELOAD", "").replace(":", " ").split()


def buffer_reuse_active() -> bool:
  """Whether the library is loaded into this very process (not just asked for)."""
  try:
    with open("/proc/self/maps") as f:
      return _LIBRARY_PREFIX in f.read()
  except OSError:
    return False


def accelerator_plugins() -> list[str]:
  """The GPU/TPU backends JAX would find installed, without importing JAX: modules of the
  `jax_plugins` namespace package and `jax_plugins` entry points (CUDA, ROCm, ...), and
  libtpu."""
  found = set()
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    found.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
  found.update(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
  try:
    if importlib.util.find_spec("libtpu") is not None:
      found.add("libtpu")
  except (ImportError, ValueError):
    pass
  return sorted(found)


def runs_on_cpu(env=None) -> bool:
  """Whether a JAX process with `env` will run on the CPU backend: JAX_PLATFORMS names only
  "cpu", or is unset and no accelerator plugin is installed."""
  env = os.environ if env is None else env
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  return not accelerator_plugins()


_NOTE = "RESNET_JAX_BUFFER_REUSE_NOTE"   # why reuse is off, for the start-up line


def describe() -> str:
  """This process's setup in one phrase, for start-up lines and benchmark headers."""
  reuse = "on" if buffer_reuse_active() else "off"
  if reuse == "off" and os.environ.get(_NOTE):
    reuse += f" ({os.environ[_NOTE]})"
  return f"malloc huge pages {'on' if enabled() else 'off'}, big-buffer reuse {reuse}"


def wanted_env(env) -> dict:
  """`env` plus what this machine supports and the user did not turn off, for a process
  that will run on the CPU backend (else `env` unchanged). Why reuse stays off, when it
  does, is kept in RESNET_JAX_BUFFER_REUSE_NOTE for `describe()`, and children do not retry."""
  env = dict(env)
  if not runs_on_cpu(env):
    return env
  if env.get("RESNET_JAX_HUGEPAGES", "1") != "0" and supported():
    env = with_tunable(env)
  reuse = env.get("RESNET_JAX_BUFFER_REUSE", "")
  if reuse == "0" or buffer_reuse_preloaded(env):
    return env
  theirs = _preloads(env)
  if theirs and reuse != "1":
    env["RESNET_JAX_BUFFER_REUSE"] = "0"
    env[_NOTE] = (f"LD_PRELOAD already holds {' '.join(theirs)}; RESNET_JAX_BUFFER_REUSE=1 "
                  "puts ours ahead of it")
    return env
  try:
    library = str(buffer_reuse_library())
    if any(c in library for c in " :"):    # LD_PRELOAD's own separators
      raise BufferReuseUnavailable(f"its path {library!r} has a space or colon, which "
                                   "LD_PRELOAD cannot take (set RESNET_JAX_KERNEL_CACHE)")
  except BufferReuseUnavailable as e:
    env["RESNET_JAX_BUFFER_REUSE"] = "0"
    env[_NOTE] = str(e)
  else:
    env["LD_PRELOAD"] = ":".join([library] + theirs)
  return env


def reexec_if_missing() -> None:
  """Restart this command with what `wanted_env` adds, when anything is missing. Call it
  through resnet_jax.lowering.prepare_process(), first thing in a `__main__`; never from
  library code (it replaces the running process)."""
  env = wanted_env(os.environ)
  if all(env.get(k) == os.environ.get(k) for k in ("LD_PRELOAD", "GLIBC_TUNABLES")):
    os.environ.update(env)    # at most the opt-out marker changed: a restart would add nothing
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
