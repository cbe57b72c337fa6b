"""train_and_evaluate: config -> TFDS -> sharded jit steps -> Orbax -> metrics."""

import json
import math
import os
import time

import jax
import numpy as np

from resnet_jax.config_schema import ConfigError
from resnet_jax.data import datasets, image_folder, input_pipeline
from resnet_jax.models import conv as conv_lib
from resnet_jax.training import checkpoints, mesh as mesh_lib, optimizer, pretrained
from resnet_jax.training import recipe, state as state_lib, steps
from resnet_jax.training.metrics_log import MetricsLog, log_main as _log
from resnet_jax.training.preemption import Preempted, PreemptionWatcher


class NonFiniteError(FloatingPointError):
  """Training produced NaN/Inf; the message names the step and the quantity."""


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


def write_config(config, workdir: str):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _write_results(workdir: str, result: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(result, f, indent=2)


def train_and_evaluate(config, workdir: str) -> dict:
  """Train `config` in `workdir` (resuming if it holds checkpoints); return final eval.

  Raises Preempted (after saving) on SIGTERM/SIGINT and NonFiniteError on NaN/Inf.
  """
  os.makedirs(workdir, exist_ok=True)
  pretrained_path = pretrained.resolve_path(config)
  pretrained_info = None
  if pretrained_path:
    # Checked before anything slow; the file's preprocessing may fill data keys (below), so
    # the run works on a copy whose config.json and checkpoints record what was used.
    pretrained_info = pretrained.read_info(pretrained_path, config.model.name)
    config = config.copy_and_resolve_references()
  data_cfg = config.data
  mesh = mesh_lib.create_mesh(config.mesh)
  nproc = jax.process_count()

  builder = datasets.prepare_builder(data_cfg)
  skipped = image_folder.skipped_files(builder) if data_cfg.dataset == "image_folder" else []
  if skipped:
    _log(f"{data_cfg.image_folder}: {len(skipped)} corrupt image file(s) skipped when the "
         f"dataset was prepared, e.g. {skipped[0]} (all listed in {builder.data_dir}"
         "/metadata.json)")
  num_classes = builder.info.features["label"].num_classes
  image_shape = input_pipeline.image_shape(builder, data_cfg)
  if pretrained_info is not None:
    pretrained.fill_preprocessing(data_cfg, pretrained_info, pretrained_path, image_shape)
  mean, std = datasets.normalization(data_cfg)

  splits = {}
  for key, read in (
      ("data.train_split", lambda: input_pipeline.train_split_info(builder, data_cfg)),
      ("data.eval_split", lambda: input_pipeline.process_split(builder, data_cfg.eval_split,
                                                               drop_remainder=False))):
    try:
      splits[key] = read()
    except KeyError as e:
      raise ConfigError(f"config key '{key}'={data_cfg[key.split('.')[1]]!r}: "
                        f"{e.args[0]}") from e
  train_split, eval_split = splits["data.train_split"], splits["data.eval_split"]
  batch = data_cfg.batch_size
  eval_batch = data_cfg.eval_batch_size or batch
  steps_per_epoch = input_pipeline.train_steps_per_epoch(train_split, data_cfg, batch, nproc)
  if steps_per_epoch == 0:
    raise ConfigError(f"config key 'data.batch_size'={batch}: expected at most the "
                      f"{train_split.num_examples_total} train examples of {data_cfg.dataset}")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  num_eval_batches = input_pipeline.num_eval_batches(eval_split.num_examples_total, nproc,
                                                     eval_batch // nproc)

  model = recipe.create_model(config.model, num_classes)
  schedule = optimizer.create_schedule(config.optimizer, config.schedule,
                                       steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  tx = optimizer.create_optimizer(config.optimizer, schedule)

  # Abstract state first: it gives the shardings, the jitted init and the restore target.
  use_ema = config.optimizer.ema_decay > 0
  init_fn = state_lib.make_init_fn(model, tx, (1,) + image_shape, config.seed, ema=use_ema)
  abstract_state = jax.eval_shape(init_fn)
  state_sharding = mesh_lib.state_shardings(abstract_state, mesh)
  ckpts = checkpoints.Checkpoints(workdir, config.checkpoint)
  identity = {"model": config.model.name, "dataset": data_cfg.dataset,
              "num_classes": num_classes}
  loaded = None
  try:
    state, start_step = ckpts.restore_latest(
        checkpoints.abstract_with_shardings(abstract_state, state_sharding), expect=identity)
    if state is None and pretrained_info is not None:
      # A fresh run only: resuming continues from the run's own checkpoint.
      loaded = pretrained.load_variables(pretrained_path, abstract_state, pretrained_info,
                                         num_classes=num_classes, model_name=config.model.name,
                                         channels=image_shape[-1])
  except BaseException:
    ckpts.close()
    raise
  write_config(config, workdir)   # after the checks above: a refused run changes nothing
  if state is not None:
    _log(f"resumed from {ckpts.directory}/{start_step}")
  else:
    start_step = 0
    state = jax.jit(init_fn, out_shardings=state_sharding)()
    if loaded is not None:
      state = pretrained.apply(state, loaded, tx, state_sharding, ema=use_ema)
  param_bytes, param_bytes_total = mesh_lib.bytes_per_device(state.params)
  _log(f"mesh {dict(mesh.shape)}: params take {param_bytes:,} of {param_bytes_total:,} bytes "
       "on each device")
  _log(f"model {config.model.name}: {state_lib.count_params(state.params):,} params; "
       f"{config.data.dataset}: {train_split.num_examples_total} train / "
       f"{eval_split.num_examples_total} eval examples; {jax.device_count()} devices on "
       f"{nproc} process(es); {steps_per_epoch} steps/epoch, {total_steps} steps; conv "
       f"lowering {conv_lib.resolve_impl()}")

  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  compiler_options = conv_lib.compiler_options()
  train_step = jax.jit(
      recipe.make_train_step(config, model, tx, schedule, num_classes, mean, std),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
      donate_argnums=(0,), compiler_options=compiler_options)
  eval_steps = {
      name: jax.jit(steps.make_eval_step(model, num_classes=num_classes, mean=mean, std=std,
                                         use_ema=name == "eval_ema"),
                    in_shardings=(state_sharding, batch_sharding), out_shardings=replicated,
                    compiler_options=compiler_options)
      for name in (("eval", "eval_ema") if use_ema else ("eval",))}
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
    ckpts.close()
    if fresh:
      _log("eval_only: evaluating freshly initialised weights (no model.pretrained and no "
           "checkpoint in the workdir)")
    result = dict(score(lambda name, metrics: _log(
        f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))),
                  step=start_step, train_seconds=0.0, eval_only=True)
    _write_results(workdir, result)
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
    def log_train(step_metrics, *, final=False):
      """Check and log one step's metrics (called one step late, or at the end)."""
      nonlocal t_last, s_last
      log_step, values = step_metrics[0], jax.device_get(step_metrics[1])
      if config.nan_policy == "stop":
        check_finite(log_step, values, last_saved)
      log.advance(log_step, {"loss": float(values["loss"])})
      if final or log_step % config.log_every_steps == 0:
        now = time.time()
        if log_step > s_last:
          values["images_per_sec"] = (log_step - s_last) * batch / max(now - t_last, 1e-9)
        t_last, s_last = now, log_step
        log.write(log_step, "train", values)

    for step in range(start_step, stop_at):
      state, metrics = train_step(state, mesh_lib.global_batch(next(train_iter), mesh))
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
        ckpts.close()
        raise Preempted(step + 1, watcher.signum)
    if pending is not None:
      log_train(pending, final=True)
    final_step = int(jax.device_get(state.step))
    train_seconds = time.time() - t_start  # includes compilation and in-loop evals
    if ckpts.latest_step() != final_step:
      save(final_step, metrics, force=True)
    if final_step < total_steps:
      _log(f"stopped at step {final_step} of {total_steps} (stop_after_steps); "
           "run the same command again to resume")
      return {"step": final_step, "stopped": True}
    result = evaluate(final_step)
  finally:
    watcher.close()
    ckpts.close()
    log.close()
  result = dict(result, step=final_step, train_seconds=round(train_seconds, 1),
                param_bytes_per_device=param_bytes, param_bytes_total=param_bytes_total,
                skipped_steps=int(jax.device_get(state.skipped_steps)))
  _write_results(workdir, result)
  return result
