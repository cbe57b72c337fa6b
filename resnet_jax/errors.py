"""What can stop a run, each with the one line it prints and its exit code.

Imports nothing of the project, so any module may raise these without an import cycle.
"""

import signal


class ConfigError(ValueError):
  """Bad input (a config key, a file, a flag); its message is the single line shown. Exit 2."""
  exit_code = 2


class NonFiniteError(FloatingPointError):
  """Training produced NaN/Inf; the message names the step and the quantity. Exit 3."""
  exit_code = 3


class Preempted(Exception):
  """SIGTERM/SIGINT: the run saved at `step` and stops. Exit 128 + the signal."""

  def __init__(self, step: int, signum: int):
    self.step, self.signum = step, signum
    super().__init__(f"preempted by {signal.Signals(signum).name} at step {step}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum   # the shell/scheduler convention for "killed by signal N"


class Stopped(BaseException):
  """SIGTERM/SIGINT outside the training loop (start-up, final evaluation): nothing is saved
  then, and nothing already saved is lost. Exit 128 + the signal.

  A BaseException, as KeyboardInterrupt is: it is raised wherever the main thread happens to
  be, and library code that catches Exception must not swallow it (logging's emit did, when
  the signal came while jax was logging a compile, and the run went on to finish)."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
