"""SIGTERM/SIGINT -> finish the current step, save, exit with 128+signal.

Single process: our own handler records the signal. Several processes: JAX's preemption
sync point (set up by jax.distributed.initialize) makes every process agree on the same
step to stop at, so all of them save the same step.
"""

import signal

import jax



class PreemptionWatcher:
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._multihost = jax.process_count() > 1
    if not self._multihost:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = signal.SIGTERM
          return True
      except RuntimeError:  # no preemption service (e.g. not started via distributed)
        return False
      return False
    return self.signum is not None

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
