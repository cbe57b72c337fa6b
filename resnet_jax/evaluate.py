"""Evaluate a run's checkpoint from its workdir alone.

  python -m resnet_jax.evaluate WORKDIR [--step N | --best] [--ema] [--split SPLIT]
                                [--config.KEY=VALUE ...]

The run's recorded config (WORKDIR/config.json) rebuilds its data, model and eval step
(training/setup.py, the trainer's own `run_eval`); the checkpoint (the latest in
WORKDIR/checkpoints, save N, or the best in WORKDIR/checkpoints_best; its raw weights or,
with --ema, their EMA) is restored read-only and checked against its checksums. It prints
top1 / top5 / loss and writes them to WORKDIR/eval_<split>_step<N>[_ema].json, a file of its
own: the run's results.json, metrics, config and checkpoints are never written, so a run can
be evaluated while it trains, or long after.

Overrides may change only keys that do not change the run (config_schema: changes_run=False):
where the data is (data.data_dir, data.manual_dir, data.image_folder), the eval batch, split
and crop (data.eval_batch_size, data.eval_split, data.crop_pct, data.eval_image_size,
data.interpolation), the lowering, the mesh. Any other key is refused in one line.

Exit codes: 0 done; 2 bad input (one line says which: no checkpoints, a missing step, --ema
on a run without EMA, an override that changes the run, a split the dataset lacks, ...).
"""

import argparse
import json
import logging
import os
import sys
import time

# TensorFlow only feeds data here (as in resnet_jax/main.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from resnet_jax.errors import ConfigError  # noqa: E402


def check_overrides(overrides: dict[str, str]) -> None:
  """ConfigError (one line) for a key that is unknown or changes the run."""
  from resnet_jax.config_schema import KEYS_BY_NAME, suggest  # noqa: PLC0415
  for key in overrides:
    if key not in KEYS_BY_NAME:
      raise ConfigError(f"unknown config key '{key}'{suggest(key, KEYS_BY_NAME)}")
    if KEYS_BY_NAME[key].changes_run:
      raise ConfigError(f"config key '{key}' changes the run, which evaluation does not: "
                        "only keys such as data.data_dir, data.eval_split, "
                        "data.eval_batch_size or data.crop_pct may be overridden "
                        "(`python -m resnet_jax --keys` lists them)")


def _write_json(path: str, result: dict) -> None:
  """Written beside and renamed into place: never half a file under the final name."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def evaluate(workdir: str, *, step: int | None = None, best: bool = False,
             ema: bool = False, split: str | None = None,
             overrides: dict[str, str] | None = None, write: bool = True) -> dict:
  """Evaluate a checkpoint of the run in `workdir` (see the module's docstring); returns the
  metrics (loss, top1, top5, examples) with step, split, ema, checkpoint and, when
  `write`, "file": where they were written. ConfigError / ValueError (one line) for bad
  input."""
  import jax  # noqa: PLC0415
  from resnet_jax import config_cli, convert  # noqa: PLC0415
  from resnet_jax.config_schema import check_keys_and_types, check_values  # noqa: PLC0415
  from resnet_jax.training import checkpoints, setup, trainer  # noqa: PLC0415
  overrides = dict(overrides or {})
  check_overrides(overrides)
  if split is not None:
    if overrides.get("data.eval_split", split) != split:
      raise ConfigError(f"--split {split} and --config.data.eval_split="
                        f"{overrides['data.eval_split']} disagree")
    overrides["data.eval_split"] = split
  # The checkpoint first: a workdir without one is the likelier mistake than its config.
  directory, step = convert.select_run_checkpoint(workdir, step=step, best=best)
  config = config_cli.load_recorded(workdir)
  config_cli.apply_overrides(config, overrides)
  check_keys_and_types(config)
  check_values(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  if ema and config.optimizer.ema_decay <= 0:
    raise ConfigError(f"{workdir}: --ema, but the run kept no EMA of its weights "
                      f"(optimizer.ema_decay={config.optimizer.ema_decay})")
  data = setup.prepare_data(config)
  run = setup.build(config, data.inputs)
  target = checkpoints.abstract_with_shardings(run.abstract_state, run.state_sharding)
  state, meta = convert.read_run_checkpoint(directory, step, target)
  expected = {"model": config.model.name, "dataset": config.data.dataset,
              "num_classes": data.inputs.num_classes}
  for key, value in expected.items():
    if key in meta and meta[key] != value:
      raise ConfigError(f"checkpoint {directory}/{step} was saved with {key}={meta[key]!r}, "
                        f"the run's config.json gives {key}={value!r}")
  if ema and not convert.run_has_ema(state):
    raise ConfigError(f"{workdir}: --ema, but checkpoint {directory}/{step} holds no EMA "
                      "weights")
  data_cfg = config.data
  eval_batch = data_cfg.eval_batch_size or data_cfg.batch_size
  metrics = trainer.run_eval(run.eval_steps["eval_ema" if ema else "eval"], state, run.mesh,
                             data.builder, data_cfg, data.eval_split,
                             batch_size=eval_batch // jax.process_count(),
                             num_batches=data.num_eval_batches(eval_batch), cache={})
  result = dict(metrics, step=step, split=data_cfg.eval_split, ema=ema,
                checkpoint=os.path.join(directory, str(step)), overrides=overrides,
                time=time.time())
  if write and jax.process_index() == 0:
    # eval_<split>_step<N>[_ema].json: the trainer's eval_only naming, never results.json.
    path = os.path.join(workdir, trainer.eval_file_name(data_cfg.eval_split, step, ema))
    _write_json(path, result)
    result["file"] = path
  return result


def _parser() -> argparse.ArgumentParser:
  from resnet_jax import convert  # noqa: PLC0415  (numpy, jax: not before a usage error)
  parser = argparse.ArgumentParser(
      prog="python -m resnet_jax.evaluate", allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=__doc__.split("\n\n", 2)[2].split("\n\nExit codes")[0],
      usage="python -m resnet_jax.evaluate WORKDIR [--step N | --best] [--ema] "
            "[--split SPLIT] [--config.KEY=VALUE ...]",
      epilog="Exit codes: 0 done; 2 bad input (one line says which).")
  parser.add_argument("workdir", metavar="WORKDIR", help="the run's workdir")
  convert.add_run_checkpoint_arguments(parser)
  parser.add_argument("--split", default=None,
                      help="the split to evaluate (default: the run's data.eval_split)")
  return parser


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, rest = _parser().parse_known_args(argv)
  from resnet_jax import config_cli  # noqa: PLC0415
  absl_log = logging.getLogger("absl")   # TFDS / Orbax notices this command cannot act on
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    overrides = config_cli.parse_overrides(rest)
    result = evaluate(args.workdir, step=args.step, best=args.best, ema=args.ema,
                      split=args.split, overrides=overrides)
  except ValueError as e:   # ConfigError is one
    print(f"evaluate: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  finally:
    absl_log.setLevel(level)
  top5 = "".join(f" {k}={result[k]:.4f}" for k in sorted(result)
                 if k.startswith("top") and k != "top1")
  where = f"; wrote {result['file']}" if "file" in result else ""
  print(f"{args.workdir} step {result['step']} ({'EMA' if result['ema'] else 'raw'} "
        f"weights), split {result['split']}: top1={result['top1']:.4f}{top5} "
        f"loss={result['loss']:.4f} ({result['examples']:.0f} examples){where}")
  return 0


if __name__ == "__main__":
  from resnet_jax import lowering
  lowering.prepare_process()   # as training's entry point does (resnet_jax/lowering.py)
  sys.exit(main())
