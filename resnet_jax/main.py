"""Command line: `python -m resnet_jax --config=configs/x.py [--config.key=value] [--workdir=DIR]`.

Thin on purpose: parsing and checking here, everything else in importable modules.
"""

import contextlib
import os
import shutil
import signal
import sys

# TensorFlow only feeds data here: keep its C++ logging and oneDNN banner out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from resnet_jax.config_cli import parse_args, resolve, split_config_arg  # noqa: E402
from resnet_jax.config_schema import check_values, describe_keys  # noqa: E402
from resnet_jax.errors import ConfigError, NonFiniteError, Preempted, Stopped  # noqa: E402

USAGE = """\
usage: python -m resnet_jax --config=FILE[.py:ARG] [--config.KEY=VALUE ...] [--workdir=DIR]
                            [--allow_config_change]
       python -m resnet_jax --keys [PATTERN]
       python -m resnet_jax --help

Train the experiment a config file describes (configs/*.py), in DIR (default
experiments/runs/<config name>[_ARG]). Running the same command again resumes from the
newest checkpoint in DIR.

  --config=FILE[:ARG]     a .py file whose get_config() (or get_config(ARG)) returns the config
  --config.KEY=VALUE      override one key, typed by the schema (--keys lists them all)
  --workdir=DIR           where checkpoints, metrics, TensorBoard files and results go
                          (--config FILE and --workdir DIR work too)
  --allow_config_change   resume although keys that change the run differ from the ones
                          the workdir's checkpoints were trained with (recorded in
                          DIR/config_changes.jsonl); without it such a rerun stops
  --keys [PATTERN]        list every config key (or those containing PATTERN): type,
                          default, allowed values, meaning

Exit codes: 0 done (or stopped as asked), 2 bad input (one line says which), 3 non-finite
training, 128+N stopped by signal N after saving (143: SIGTERM), anything else a failure."""


def default_workdir(config_path: str) -> str:
  """experiments/runs/<config file name>[_<arg>]: one folder per experiment."""
  path, arg = split_config_arg(config_path)
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("experiments", "runs", f"{name}_{arg}" if arg else name)


def check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: processes of one run check the same workdir at the same time.
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from e


def _holds_no_file(folder: str) -> bool:
  return all(not files for _, _, files in os.walk(folder))


def _holds_a_checkpoint(workdir: str) -> bool:
  """A finished step folder (Orbax names them by the step; a save in progress is a *.orbax-
  checkpoint-tmp-* folder) in workdir/checkpoints."""
  try:
    return any(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
  except OSError:
    return False


@contextlib.contextmanager
def _stop_on_signals():
  """SIGTERM/SIGINT outside the training loop (which saves first: PreemptionWatcher) stop
  the command with a line and 128 + the signal, instead of a silent -15 or a traceback."""
  def stop(signum, frame):
    del frame
    raise Stopped(signum)
  previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def main(argv=None, *, exit_at_once_when_stopped: bool = False) -> int:
  """The command; returns its exit code. `exit_at_once_when_stopped` (the command line's
  own process only): a run stopped by a signal outside the training loop ends the process
  right after its line; see _exit_now."""
  argv = sys.argv[1:] if argv is None else argv
  with _stop_on_signals():
    code = _main(argv, exit_at_once_when_stopped)
  # Every orderly ending (done, stopped, bad input: each process gets the same verdict):
  # the run's other processes must not take this one for dead (resnet_jax/peer_watch.py).
  # A crash never gets here; its peers then leave at once.
  from resnet_jax import distributed
  distributed.goodbye()
  return code


def _quiet_library_warnings() -> None:
  """TFDS and Orbax log through absl at WARNING what a user of this command cannot act on
  ("Variant folder ... has no dataset_info.json", "Using custom data configuration"); they
  came before our own one-line errors. Errors still show."""
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)


def _exit_now(code: int) -> None:
  """End the process without interpreter shutdown. A signal stops the main thread where it
  is, and that can be while a library still works in a thread of its own: jax compiling the
  step the main thread was waiting for. Shutdown then tears the runtime down under that
  thread -- a segfault after our line, instead of 128 + the signal (5 of 12 SIGTERMs sent
  during start-up). Nothing of the run is left to finish by then: the checkpoints and the
  metrics files were closed on the way out, and the peers are told it is on purpose."""
  from resnet_jax import distributed
  distributed.goodbye()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _main(argv, exit_at_once_when_stopped: bool = False) -> int:
  _quiet_library_warnings()
  if argv and argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0
  if argv and argv[0] == "--keys":
    if len(argv) > 2:
      print("resnet_jax: error: --keys takes at most one PATTERN", file=sys.stderr)
      return 2
    lines = describe_keys(argv[1] if len(argv) == 2 else "")
    print("\n".join(lines) if lines else f"no config key contains {argv[1]!r}")
    return 0 if lines else 2
  workdir, created = None, False
  try:
    config_path, overrides, flags = parse_args(argv)
    config, settled = resolve(config_path, overrides)
    import jax  # after the cheap checks, so a typo fails fast
    from resnet_jax import distributed, lowering
    distributed.initialize_from_env()
    check_values(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    lowering.choose(config.lowering)   # a lowering that runs here, before anything is written
    workdir = flags.get("workdir") or default_workdir(config_path)
    created = not os.path.exists(workdir)
    check_workdir(workdir)
    from resnet_jax.training import trainer
    from resnet_jax.training.metrics_log import log_main
    for line in settled:
      log_main(line)
    try:
      result = trainer.train_and_evaluate(
          config, workdir, allow_config_change="allow_config_change" in flags)
    except Preempted as e:
      print(f"resnet_jax: {e}: checkpoint saved in {workdir}; run the same command to "
            f"resume (exit {e.exit_code})", file=sys.stderr)
      return e.exit_code
    except (ConfigError, NonFiniteError, Stopped):
      raise
    except Exception as e:  # noqa: BLE001 -- a peer gone, in a multi-process run: one line
      distributed.exit_on_peer_failure(e, workdir)
      raise
  except Stopped as e:
    saved = bool(workdir) and _holds_a_checkpoint(workdir)
    kept = f"the newest checkpoint in {workdir} is kept" if saved else "nothing was saved"
    if created and workdir and not saved:
      # This run made the folder and saved nothing in it (its config.json, empty
      # checkpoint folders): the same command later starts afresh either way.
      shutil.rmtree(workdir, ignore_errors=True)
    print(f"resnet_jax: {e} outside the training loop; {kept} (exit {e.exit_code})",
          file=sys.stderr, flush=True)
    if exit_at_once_when_stopped:
      _exit_now(e.exit_code)
    return e.exit_code
  except (ConfigError, NonFiniteError) as e:
    if created and workdir and os.path.isdir(workdir) and _holds_no_file(workdir):
      shutil.rmtree(workdir, ignore_errors=True)   # a refused run leaves nothing behind
    # Every process of a multi-process run says it (NPROC=N's launcher shows a line once).
    print(f"resnet_jax: error: {e}", file=sys.stderr, flush=True)
    return e.exit_code
  if result.get("stopped"):
    return 0
  if jax.process_index() == 0:
    top5 = next((f", {k}={v:.4f}" for k, v in result.items() if k.startswith("top") and
                 k != "top1"), "")
    how = "no training" if result.get("eval_only") else f"{result['train_seconds']:.0f}s training"
    print(f"final test accuracy: top1={result['top1']:.4f}{top5} "
          f"({result['examples']:.0f} examples, step {result['step']}, {how}); "
          f"workdir {workdir}")
  return 0


if __name__ == "__main__":
  from resnet_jax import lowering
  lowering.prepare_process()   # CPU-backend processes only; see resnet_jax/lowering.py
  sys.exit(main(exit_at_once_when_stopped=True))
