"""Metrics to stdout, TensorBoard event files, metrics.jsonl and a progress bar (process 0)."""

import json
import os
import sys
import time

import jax
import tqdm


def log_main(msg: str):
  """A run-level message, printed once (by process 0) however many processes run."""
  if jax.process_index() == 0:
    print(msg, flush=True)


# Train metrics that describe the logged step itself; every other one is averaged over the
# steps since the previous line (a single batch's loss is noise).
POINT_METRICS = ("learning_rate", "param_norm", "skipped_steps")


class IntervalMeans:
  """Train metrics summed step by step, read as means over the interval since the last read
  (the point metrics: the latest step's)."""

  def __init__(self):
    self._sums, self._count, self._last = {}, 0, {}

  def add(self, values: dict) -> None:
    for key, value in values.items():
      value = float(value)
      self._last[key] = value
      if key not in POINT_METRICS:
        self._sums[key] = self._sums.get(key, 0.0) + value
    self._count += 1

  def take(self) -> dict:
    """The interval's means (and the latest point values); starts a new interval."""
    out = {k: (v if k in POINT_METRICS else self._sums[k] / self._count)
           for k, v in self._last.items()}
    self._sums, self._count, self._last = {}, 0, {}
    return out


def _fmt(value):
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return str(value)


class MetricsLog:
  def __init__(self, workdir: str, *, total_steps: int, start_step: int):
    self.enabled = jax.process_index() == 0
    self._writer = None
    self._bar = None
    if not self.enabled:
      return
    import tensorflow as tf  # the TensorBoard writer; tf is already imported for tf.data
    self._tf = tf
    self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    # One JSON object per line: easy to plot and to assert on in tests.
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    # A live bar on a terminal; in logs (CI, SLURM) the periodic lines carry the ETA.
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                          dynamic_ncols=True, disable=not sys.stderr.isatty(), leave=False)
    self._t0, self._s0, self._total = time.time(), start_step, total_steps

  def eta_seconds(self, step: int) -> float:
    done = step - self._s0
    return (time.time() - self._t0) / done * (self._total - step) if done > 0 else float("nan")

  def advance(self, step: int, postfix: dict | None = None):
    if self._bar is not None:
      self._bar.n = step
      if postfix:
        self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
      self._bar.refresh()

  def write(self, step: int, prefix: str, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    # Grouped values (grad_norm/stage1, ...) go to the files only: the line stays readable.
    line = f"[{prefix} step {step}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()
                                                   if "/" not in k)
    if prefix == "train":
      eta = self.eta_seconds(step)
      if eta == eta:  # not nan
        line += f", eta={eta:.0f}s"
    if self._bar is not None and not self._bar.disable:
      self._bar.write(line)
    else:
      print(line, flush=True)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self._jsonl.flush()
    with self._writer.as_default(step=step):
      for k, v in scalars.items():
        self._tf.summary.scalar(f"{prefix}/{k}", v)
    self._writer.flush()

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
      self._jsonl.close()
