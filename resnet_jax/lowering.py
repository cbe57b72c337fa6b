"""The one seam between the network and backend speed: which layers a model is built with,
and which compiler options the jit that runs it gets.

  lowering = lowering.choose("auto")
  model = models.create("resnet50", num_classes=1000, **lowering.layers)
  step = lowering.jit(train_step, in_shardings=..., out_shardings=...)

Choices:
  "native": the model's own layers (flax's nn.Conv and max pool, our BatchNorm), lowered by
            XLA as they are: cuDNN / TPU convolutions; on CPU XLA's own (slower).
  "onednn", "cpu": the CPU lowerings of the optional package resnet_jax/cpu_speed
            (oneDNN kernels, or XLA:CPU arranged as it runs fastest). CPU backend only.
  "auto":   the default. GPU/TPU: native. CPU: onednn where its kernels build, else cpu
            (saying why), else -- without resnet_jax/cpu_speed -- native.
Every lowering has the same parameters and computes the same numbers to float32 rounding;
only speed differs. The choice is made once, where a run is set up (config key `lowering`,
the benchmark's `--lowering`), never read again while tracing.

`prepare_process()` is the other half: the CPU package's allocator setup, which must happen
before JAX starts, for processes that will run on the CPU backend only.
"""

import dataclasses
import importlib.util
from typing import Any, Callable

from resnet_jax.errors import ConfigError

LOWERINGS = ("auto", "native", "onednn", "cpu")
_CPU_SPEED = "resnet_jax.cpu_speed"


@dataclasses.dataclass(frozen=True)
class Lowering:
  name: str                                   # "native", "onednn" or "cpu"
  layers: dict = dataclasses.field(default_factory=dict)   # conv/norm/pool for models.create
  compiler_options: dict | None = None
  note: str = ""                              # why "auto" chose this, when it is worth saying

  def jit(self, fn: Callable, **kwargs) -> Any:
    """`jax.jit(fn, **kwargs)` with this lowering's compiler options."""
    import jax
    return jax.jit(fn, compiler_options=self.compiler_options, **kwargs)


class LoweringUnavailable(ConfigError):
  """The asked-for lowering cannot run here; the message says why in one line."""


def cpu_speed_installed() -> bool:
  try:
    return importlib.util.find_spec(_CPU_SPEED) is not None
  except ImportError:
    return False


def choose(name: str = "auto", backend: str | None = None) -> Lowering:
  """The lowering `name` means on `backend` (default: JAX's default backend)."""
  if name not in LOWERINGS:
    raise LoweringUnavailable(f"unknown lowering {name!r}; expected one of "
                              f"{', '.join(LOWERINGS)}")
  if backend is None:
    import jax
    backend = jax.default_backend()
  if name == "native" or (name == "auto" and backend != "cpu"):
    return Lowering("native")
  if backend != "cpu":
    raise LoweringUnavailable(f"lowering {name!r} runs on the CPU backend only, not on "
                              f"{backend!r}; use 'auto' or 'native'")
  if not cpu_speed_installed():
    if name == "auto":
      return Lowering("native", note=f"{_CPU_SPEED} is not installed: XLA's own CPU "
                                     "convolutions (slower)")
    raise LoweringUnavailable(f"lowering {name!r} needs the {_CPU_SPEED} package, which is "
                              "not installed")
  from resnet_jax.cpu_speed import lowering as cpu
  note = ""
  if name == "auto":
    reason = cpu.unavailable_reason("onednn")
    name = "onednn" if reason is None else "cpu"
    if reason:
      note = f"the oneDNN CPU kernels are unavailable ({reason}); using the slower " \
             "XLA-only 'cpu' lowering"
  elif (reason := cpu.unavailable_reason(name)) is not None:
    raise LoweringUnavailable(f"lowering {name!r}: {reason}")
  return Lowering(name, cpu.layers(name), cpu.compiler_options(), note)


def prepare_process() -> None:
  """First thing in a command-line entry point (`if __name__ == "__main__"`), before JAX
  starts: for a process that will run on the CPU backend, restart it once with the CPU
  package's allocator setup (resnet_jax/cpu_speed/allocator.py). Nothing happens on GPU/TPU
  machines, without the package, or when the user turned it off. Never call it from library
  code: it replaces the running process."""
  if not cpu_speed_installed():
    return
  from resnet_jax.cpu_speed import allocator   # standard library only: JAX not yet started
  allocator.reexec_if_missing()


def describe_process() -> str:
  """One phrase on this process's allocator setup for start-up lines and benchmark headers
  ("" when it has none)."""
  if not cpu_speed_installed():
    return ""
  from resnet_jax.cpu_speed import allocator
  return allocator.describe() if allocator.runs_on_cpu() else ""
