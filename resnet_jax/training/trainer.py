"""train_and_evaluate: config -> TFDS -> sharded jit steps -> Orbax -> metrics."""

import json
import os
import time

import jax
import numpy as np

from resnet_jax import lowering as lowering_lib
from resnet_jax.config_schema import changed_run_keys
from resnet_jax.data import input_pipeline
from resnet_jax.errors import ConfigError, NonFiniteError, Preempted
from resnet_jax.training import checkpoints, mesh as mesh_lib, pretrained, setup
from resnet_jax.training import state as state_lib
from resnet_jax.training.metrics_log import IntervalMeans, MetricsLog, log_main as _log
from resnet_jax.training.preemption import PreemptionWatcher


def start_up_line(lowering) -> str:
  """How this process computes: the lowering (and why, when "auto" fell back) and, on CPU,
  the allocator setup (resnet_jax/cpu_speed/allocator.py)."""
  line = f"lowering {lowering.name}" + (f" ({lowering.note})" if lowering.note else "")
  process = lowering_lib.describe_process()
  return f"{line}; {process}" if process else line


def check_finite(step: int, metrics: dict, last_saved):
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    names = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise NonFiniteError(f"non-finite {names} at step {step}; stopped without saving it "
                         f"(last checkpoint: step {last_saved}). Lower the learning rate, or "
                         "set --config.nan_policy=skip to skip such steps")


def run_eval(eval_step, state, mesh, builder, data_cfg, split_info, *, batch_size: int,
             num_batches: int, cache: dict) -> dict[str, float]:
  totals = None
  for local in input_pipeline.eval_batches(builder, data_cfg, batch_size=batch_size,
                                           split_info=split_info, num_batches=num_batches,
                                           dataset_cache=cache):
    sums = eval_step(state, mesh_lib.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  if int(count) != split_info.num_examples_total:
    raise RuntimeError(f"eval saw {count:.0f} examples, split has "
                       f"{split_info.num_examples_total}")
  out = {"loss": float(totals.pop("loss_sum")) / count}
  for key, value in totals.items():
    out[key.replace("_correct", "")] = float(value) / count
  out["examples"] = count
  return out


def config_changes(recorded: dict, config, directory: str, step: int, *, allow: bool):
  """The keys that change the run and differ between the checkpoint's config and this one.
  ConfigError listing them (and the ways on) unless `allow`."""
  changed = changed_run_keys(recorded, config)
  if changed and not allow:
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed[:6])
    more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
    raise ConfigError(f"this config differs from the one {directory}/{step} was trained with: "
                      f"{shown}{more}; use a new --workdir for a new run, or add "
                      "--allow_config_change to continue this one with the new values")
  return changed


def record_config_changes(workdir: str, step: int, changes) -> None:
  """Say and append to config_changes.jsonl what a resumed run changed, and from which step."""
  _log(f"config changed at step {step} (--allow_config_change): " +
       ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, "time": time.time(),
                          "changes": {k: [a, b] for k, a, b in changes}}) + "\n")


def write_config(config, workdir: str):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _write_results(workdir: str, result: dict, name: str = "results.json") -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(result, f, indent=2)


def eval_file_name(split: str, step: int, ema: bool = False) -> str:
  """Where an evaluation of a workdir's checkpoint goes: never results.json, which holds
  the training run's own final evaluation."""
  return f"eval_{split}_step{step}{'_ema' if ema else ''}.json"


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Train `config` in `workdir` (resuming if it holds checkpoints); return final eval.

  `config` is resolved (config_cli.resolve). A resume whose config differs from the one the
  checkpoint was trained with in a key that changes the run is refused (ConfigError), unless
  `allow_config_change`, which continues and records the change in config_changes.jsonl.
  Raises Preempted (after saving) on SIGTERM/SIGINT and NonFiniteError on NaN/Inf.
  """
  os.makedirs(workdir, exist_ok=True)
  data = setup.prepare_data(config)
  if data.skipped_files:
    _log(f"{config.data.image_folder}: {len(data.skipped_files)} corrupt image file(s) "
         f"skipped when the dataset was prepared, e.g. {data.skipped_files[0]} (all listed "
         f"in {data.builder.data_dir}/metadata.json)")
  run = setup.build(config, data.inputs)
  warnings = setup.check_durations(config, data.inputs.steps_per_epoch, run.total_steps)
  pretrained_path = pretrained.resolve_path(config)
  ckpts = checkpoints.Checkpoints(workdir, config.checkpoint)
  try:
    return _train_and_evaluate(config, workdir, data, run, ckpts, pretrained_path, warnings,
                               allow_config_change=allow_config_change)
  finally:
    # Whatever ends the run -- done, refused, or a SIGTERM anywhere in start-up -- Orbax's
    # managers are closed before the interpreter shuts down: a manager left open (its
    # clean-up thread still running) crashed the exit after our last line, with a
    # traceback or a segfault instead of the exit code.
    ckpts.close()


def _train_and_evaluate(config, workdir, data, run, ckpts, pretrained_path, warnings, *,
                        allow_config_change):
  """The run once its checkpoints are open; train_and_evaluate closes them."""
  data_cfg, mesh, state_sharding = config.data, run.mesh, run.state_sharding
  nproc = jax.process_count()
  batch = data_cfg.batch_size
  eval_batch = data_cfg.eval_batch_size or batch
  steps_per_epoch, total_steps = data.inputs.steps_per_epoch, run.total_steps
  eval_every = setup.eval_interval(config, steps_per_epoch)
  num_eval_batches = data.num_eval_batches(eval_batch)
  num_classes, image_shape = data.inputs.num_classes, data.inputs.image_shape

  identity = {"model": config.model.name, "dataset": data_cfg.dataset,
              "num_classes": num_classes}
  loaded = None
  state, start_step = ckpts.restore_latest(
      checkpoints.abstract_with_shardings(run.abstract_state, state_sharding),
      expect=identity)
  if pretrained_path:
    pretrained.report_differences(config, image_shape)
  if state is not None:
    changes = config_changes(ckpts.read_meta(start_step).get("config", {}), config,
                             ckpts.directory, start_step, allow=allow_config_change)
  if state is None and pretrained_path:
    # A fresh run only: resuming continues from the run's own checkpoint.
    loaded = pretrained.load_variables(pretrained_path, run.abstract_state,
                                       num_classes=num_classes, model_name=config.model.name,
                                       channels=image_shape[-1])
  # After the checks above, so a refused run changes nothing; an evaluation leaves the
  # training run's record alone.
  if not (config.eval_only and os.path.exists(os.path.join(workdir, "config.json"))):
    write_config(config, workdir)
  for line in warnings:
    _log(line)
  if state is not None:
    _log(f"resumed from {ckpts.directory}/{start_step}")
    if changes:
      record_config_changes(workdir, start_step, changes)
  else:
    start_step = 0
    state = run.init_state()
    if loaded is not None:
      state = pretrained.apply(state, loaded, run.tx, state_sharding,
                               ema=config.optimizer.ema_decay > 0)
  param_bytes, param_bytes_total = mesh_lib.bytes_per_device(state.params)
  _log(f"mesh {dict(mesh.shape)}: params take {param_bytes:,} of {param_bytes_total:,} bytes "
       "on each device")
  _log(f"model {config.model.name}: {state_lib.count_params(state.params):,} params; "
       f"{config.data.dataset}: {data.train_split.num_examples_total} train / "
       f"{data.eval_split.num_examples_total} eval examples; {jax.device_count()} devices on "
       f"{nproc} process(es); {steps_per_epoch} steps/epoch, {total_steps} steps")
  _log(start_up_line(run.lowering))

  eval_steps = run.eval_steps
  builder, eval_split = data.builder, data.eval_split
  train_split = data.train_split
  eval_cache: dict = {}
  run_meta = dict(identity, config=config.to_dict(), code_version=checkpoints.code_version(),
                  devices=jax.device_count(), processes=nproc)
  last_eval: dict = {}
  last_saved = start_step if ckpts.latest_step() is not None else None

  def meta(step, metrics):
    return dict(run_meta, step=step, metrics=metrics, eval=last_eval, time=time.time())

  def save(step, metrics, *, force=False):
    """Every save goes through here: the step's metrics are checked before it is written."""
    nonlocal last_saved
    metrics = jax.device_get(metrics) if metrics is not None else {}
    if config.nan_policy == "stop":
      check_finite(step, metrics, last_saved)
    if ckpts.save(step, state, meta(step, {k: float(v) for k, v in metrics.items()}),
                  force=force):
      last_saved = step

  def score(report):
    """Every eval step over the eval split: the raw weights' metrics, their EMA's as ema_*.
    report(name, metrics) is told each (name "eval" or "eval_ema") as it is computed."""
    merged = {}
    for name, eval_step in eval_steps.items():
      metrics = run_eval(eval_step, state, mesh, builder, data_cfg, eval_split,
                         batch_size=eval_batch // nproc, num_batches=num_eval_batches,
                         cache=eval_cache)
      report(name, metrics)
      merged.update(metrics if name == "eval" else {f"ema_{k}": v for k, v in metrics.items()})
    return merged

  def evaluate(step):
    """Raw weights (and their EMA, logged as eval_ema); returns the metrics, best kept."""
    nonlocal last_eval
    last_eval = score(lambda name, metrics: log.write(step, name, metrics))
    ckpts.save_best(step, state, meta(step, {}), last_eval)
    return last_eval

  if config.eval_only:
    fresh = loaded is None and ckpts.latest_step() is None
    if fresh:
      _log("eval_only: evaluating freshly initialised weights (no model.pretrained and no "
           "checkpoint in the workdir)")
    written = []

    def report(name, metrics):
      # One file per weights evaluated (raw, EMA), as `python -m resnet_jax.evaluate` does.
      ema = name == "eval_ema"
      file = eval_file_name(data_cfg.eval_split, start_step, ema=ema)
      _write_results(workdir, dict(metrics, step=start_step, split=data_cfg.eval_split,
                                   ema=ema, eval_only=True), file)
      written.append(os.path.join(workdir, file))
      _log(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    result = dict(score(report), step=start_step, train_seconds=0.0, eval_only=True)
    _log(f"eval_only: results in {' and '.join(written)} (results.json is the training "
         "run's)")
    return result

  stop_at = total_steps
  if config.stop_after_steps > 0:
    stop_at = min(total_steps, config.stop_after_steps)
  log = MetricsLog(workdir, total_steps=total_steps, start_step=start_step)
  watcher = PreemptionWatcher()
  result, metrics = None, None
  try:
    train_iter = input_pipeline.train_batches(
        builder, data_cfg, seed=config.seed, global_batch=batch, start_step=start_step,
        split_info=train_split, process_index=jax.process_index(), process_count=nproc)
    pending = None  # metrics of the previous step, fetched one step late
    t_start = t_last = time.time()
    s_last = start_step
    interval = IntervalMeans()
    def log_train(step_metrics, *, final=False):
      """Check one step's metrics (one step late, or at the end); every log_every_steps,
      log their means over the interval."""
      nonlocal t_last, s_last
      log_step, values = step_metrics[0], jax.device_get(step_metrics[1])
      if config.nan_policy == "stop":
        check_finite(log_step, values, last_saved)
      interval.add(values)
      log.advance(log_step, {"loss": float(values["loss"])})
      if final or log_step % config.log_every_steps == 0:
        now = time.time()
        means = interval.take()
        if log_step > s_last:
          means["images_per_sec"] = (log_step - s_last) * batch / max(now - t_last, 1e-9)
        t_last, s_last = now, log_step
        log.write(log_step, "train", means)

    for step in range(start_step, stop_at):
      if step == config.model.unfreeze_step and config.model.frozen and step > 0:
        _log(f"step {step}: model.frozen parts ({', '.join(config.model.frozen)}) train from "
             "here on (model.unfreeze_step)")
      state, metrics = run.train_step_at(step)(state,
                                              mesh_lib.global_batch(next(train_iter), mesh))
      if pending is not None:
        log_train(pending)
      pending = (step + 1, metrics)
      if ckpts.should_save(step + 1):
        save(step + 1, metrics)
      if (step + 1) % eval_every == 0 and step + 1 < total_steps:
        evaluate(step + 1)
      if watcher.should_stop(step + 1):
        if ckpts.latest_step() != step + 1:
          save(step + 1, metrics, force=True)
        log_train(pending, final=True)
        raise Preempted(step + 1, watcher.signum)
    if pending is not None:
      log_train(pending, final=True)
    final_step = int(jax.device_get(state.step))
    train_seconds = time.time() - t_start  # includes compilation and in-loop evals
    if ckpts.latest_step() != final_step:
      save(final_step, metrics, force=True)
    if final_step < total_steps:
      how = ("already there: nothing to train" if final_step == start_step else "saved")
      _log(f"stopped at step {final_step} of {total_steps} (stop_after_steps="
           f"{config.stop_after_steps}; {how}); to continue, run the same command without "
           "--config.stop_after_steps, or with a larger value")
      return {"step": final_step, "stopped": True}
    result = evaluate(final_step)
  finally:
    watcher.close()
    ckpts.close()   # before the results are written: pending async saves are on disk
    log.close()
  result = dict(result, step=final_step, train_seconds=round(train_seconds, 1),
                param_bytes_per_device=param_bytes, param_bytes_total=param_bytes_total,
                skipped_steps=int(jax.device_get(state.skipped_steps)))
  _write_results(workdir, result)
  return result
