"""Build, load and register the CPU kernels' shared library.

The C++ sources beside this file are compiled on first use with the machine's C++ compiler
(g++, or $CXX) against jax's XLA FFI headers and the oneDNN of the `onednn-cpu-gomp` /
`onednn-devel-cpu-gomp` wheels (installed into the environment's `lib/` and `include/`), and
cached under $RESNET_JAX_KERNEL_CACHE (default ~/.cache/resnet_jax/cpu_kernels). The file
name hashes everything the binary depends on -- sources, compiler and flags, the FFI
headers, the oneDNN build and this CPU's instruction sets (-march=native) -- so a changed
input rebuilds and a cache shared between different machines never loads a foreign build.
Concurrent processes wait for each other on a lock file instead of compiling twice.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax

from resnet_jax.cpu_speed import native_build

_HERE = Path(__file__).resolve().parent
SOURCES = ("onednn_conv.cc", "channel_sums.cc", "max_pool.cc")
HEADERS = ("kernel_lock.h",)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> exported handler symbol.
TARGETS = {
    "resnet_jax_conv_forward": "ResnetJaxConvForward",
    "resnet_jax_conv_backward_data": "ResnetJaxConvBackwardData",
    "resnet_jax_conv_backward_weights": "ResnetJaxConvBackwardWeights",
    "resnet_jax_channel_sums": "ResnetJaxChannelSums",
    "resnet_jax_centred_sums": "ResnetJaxCentredSums",
    "resnet_jax_max_pool_forward": "ResnetJaxMaxPoolForward",
    "resnet_jax_max_pool_backward": "ResnetJaxMaxPoolBackward",
}


class KernelsUnavailable(RuntimeError):
  """Why this machine cannot run the kernels (one line, says what is missing)."""


def _onednn_root() -> Path:
  """The prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so.3."""
  candidates = [os.environ.get("RESNET_JAX_ONEDNN_ROOT"), sys.prefix, sys.base_prefix]
  for root in filter(None, candidates):
    root = Path(root)
    if (root / "include/oneapi/dnnl/dnnl.hpp").is_file() and (root / "lib/libdnnl.so.3").exists():
      return root
  raise KernelsUnavailable(
      f"oneDNN not found under {', '.join(filter(None, candidates))} (expected "
      "include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so.3: pip install onednn-cpu-gomp "
      "onednn-devel-cpu-gomp, or set RESNET_JAX_ONEDNN_ROOT)")


def _compiler() -> str:
  candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
  for cxx in candidates:
    if found := shutil.which(cxx):
      return found
  raise KernelsUnavailable(f"no C++ compiler found (looked for {' and '.join(candidates)}"
                           f"{'' if os.environ.get('CXX') else '; set $CXX'})")


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def _command(cxx: str, onednn: Path, output: Path) -> list[str]:
  lib = onednn / "lib"
  return [cxx, *_FLAGS, *(str(_HERE / s) for s in SOURCES), f"-I{_HERE}",
          f"-I{jax.ffi.include_dir()}", f"-I{onednn / 'include'}", f"-L{lib}",
          "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}", "-o", str(output)]


def _build_key(cxx: str, onednn: Path) -> str:
  h = hashlib.sha256()
  for path in [*(_HERE / f for f in SOURCES + HEADERS),
               *sorted(Path(jax.ffi.include_dir()).rglob("*.h")),
               onednn / "include/oneapi/dnnl/dnnl_version.h"]:
    h.update(str(path).encode() + path.read_bytes())
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  h.update("\0".join([version, " ".join(_FLAGS), str((onednn / "lib/libdnnl.so.3").resolve()),
                      _cpu_flags()]).encode())
  return h.hexdigest()[:16]


def build() -> Path:
  """The compiled library for this machine, built now if the cache has none."""
  if sys.platform != "linux" or platform.machine() != "x86_64":
    raise KernelsUnavailable(f"built for x86-64 Linux only (this is {sys.platform} "
                             f"{platform.machine()}): oneDNN's wheels exist only there")
  cxx, onednn = _compiler(), _onednn_root()
  target = native_build.cache_dir() / f"resnet_jax_cpu_kernels-{_build_key(cxx, onednn)}.so"
  return native_build.compile_once(
      target, lambda out: _command(cxx, onednn, out),
      f"compiling {', '.join(SOURCES)} with {cxx}", KernelsUnavailable)


@functools.cache
def load() -> ctypes.CDLL:
  """Build (if needed) and load the library and register its FFI targets with XLA:CPU.
  Raises KernelsUnavailable, saying why, where this machine cannot."""
  path = build()
  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:
    raise KernelsUnavailable(f"loading {path} failed: {e}") from e
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


@functools.cache
def unavailable_reason() -> str | None:
  """None when the kernels run here, else one line saying why not."""
  try:
    load()
  except KernelsUnavailable as e:
    return str(e)
  return None


def available() -> bool:
  return unavailable_reason() is None
