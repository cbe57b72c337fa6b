"""Command line: `python -m resnet_jax --config=configs/x.py [--config.key=value] [--workdir=DIR]`.

Thin on purpose: parsing and checking here, everything else in importable modules.
"""

import os
import sys

# TensorFlow only feeds data here: keep its C++ logging and oneDNN banner out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from resnet_jax.config_cli import parse_args, resolve, split_config_arg  # noqa: E402
from resnet_jax.config_schema import check_values  # noqa: E402
from resnet_jax.errors import ConfigError, NonFiniteError, Preempted  # noqa: E402


def default_workdir(config_path: str) -> str:
  """experiments/runs/<config file name>[_<arg>]: one folder per experiment."""
  path, arg = split_config_arg(config_path)
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("experiments", "runs", f"{name}_{arg}" if arg else name)


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: processes of one run check the same workdir at the same time.
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from e


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    config_path, overrides, flags = parse_args(argv)
    config, settled = resolve(config_path, overrides)
    import jax  # after the cheap checks, so a typo fails fast
    from resnet_jax import distributed, lowering
    distributed.initialize_from_env()
    check_values(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    lowering.choose(config.lowering)   # a lowering that runs here, before anything is written
    workdir = flags.get("workdir") or default_workdir(config_path)
    check_workdir(workdir)
    from resnet_jax.training import trainer
    from resnet_jax.training.metrics_log import log_main
    for line in settled:
      log_main(line)
    try:
      result = trainer.train_and_evaluate(config, workdir)
    except Preempted as e:
      print(f"resnet_jax: {e}: checkpoint saved in {workdir}; run the same command to "
            f"resume (exit {e.exit_code})", file=sys.stderr)
      return e.exit_code
  except (ConfigError, NonFiniteError) as e:
    print(f"resnet_jax: error: {e}", file=sys.stderr)
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
  sys.exit(main())
