"""One setup for every command that runs a model: config -> data, model, optimizer, state
and shardings, jitted steps. Training (trainer.py) drives the loop over it; the benchmark,
evaluation and prediction build from the same pieces, so they run the same compiled step.

  data = setup.prepare_data(config)                       # TFDS, splits, image shape, ...
  run = setup.build(config, data.inputs)                  # model, optimizer, shardings, steps
  state = run.init_state()
  state, metrics = run.train_step(state, batch)

The input pipeline (TensorFlow) is imported by `prepare_data` only: a synthetic benchmark
never loads it.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from resnet_jax import lowering as lowering_lib
from resnet_jax import models
from resnet_jax.config_schema import MAX_STEPS
from resnet_jax.errors import ConfigError
from resnet_jax.training import mesh as mesh_lib, optimizer, state as state_lib, steps


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What the model and the steps need to know about the batches."""
  image_shape: tuple[int, ...]      # one image, HWC
  num_classes: int
  mean: tuple[float, ...]           # per channel, 0..255 units, normalised on device
  std: tuple[float, ...]
  steps_per_epoch: int              # for epoch-based schedules and durations


@dataclasses.dataclass(frozen=True)
class Data:
  """A prepared dataset and what this process reads of it."""
  builder: Any
  train_split: Any                  # input_pipeline.SplitInfo
  eval_split: Any
  inputs: Inputs
  skipped_files: tuple[str, ...] = ()   # image_folder: corrupt files left out when prepared

  def num_eval_batches(self, eval_batch: int) -> int:
    from resnet_jax.data import input_pipeline
    nproc = jax.process_count()
    return input_pipeline.num_eval_batches(self.eval_split.num_examples_total, nproc,
                                           eval_batch // nproc)


def prepare_data(config) -> Data:
  """The config's dataset prepared in data_dir, its splits as this process reads them and
  the shapes the model needs. ConfigError for a split the dataset lacks or a batch larger
  than the train split."""
  from resnet_jax.data import datasets, image_folder, input_pipeline
  data_cfg = config.data
  builder = datasets.prepare_builder(data_cfg)
  skipped = image_folder.skipped_files(builder) if data_cfg.dataset == "image_folder" else []
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
  train_split = splits["data.train_split"]
  steps_per_epoch = input_pipeline.train_steps_per_epoch(
      train_split, data_cfg, data_cfg.batch_size, jax.process_count())
  if steps_per_epoch == 0:
    raise ConfigError(f"config key 'data.batch_size'={data_cfg.batch_size}: expected at most "
                      f"the {train_split.num_examples_total} train examples of "
                      f"{data_cfg.dataset}")
  mean, std = datasets.normalization(data_cfg)
  inputs = Inputs(image_shape=input_pipeline.image_shape(builder, data_cfg),
                  num_classes=builder.info.features["label"].num_classes,
                  mean=mean, std=std, steps_per_epoch=steps_per_epoch)
  return Data(builder, train_split, splits["data.eval_split"], inputs, tuple(skipped))


def create_model(model_cfg, num_classes: int, lowering: lowering_lib.Lowering, *,
                 name: str = "", dtype: str = "", frozen_bn: tuple[str, ...] = ()):
  """The model a config's `model` section describes, built with `lowering`'s layers
  (`name` / `dtype` override the section's own); `frozen_bn`: parts whose BatchNorm stays
  in inference mode (ResNet.frozen_stages)."""
  overrides = {} if model_cfg.se_ratio < 0 else {"se_ratio": model_cfg.se_ratio}
  if model_cfg.bn_epsilon > 0:   # else the model's own (Keras-layout weights: 1.001e-5)
    overrides["bn_epsilon"] = model_cfg.bn_epsilon
  return models.create(name or model_cfg.name, num_classes=num_classes,
                       dtype=dtype or model_cfg.dtype,
                       drop_path_rate=model_cfg.drop_path_rate,
                       zero_init_last_bn=model_cfg.zero_init_last_bn,
                       bn_momentum=model_cfg.bn_momentum,
                       bn_group_size=model_cfg.bn_group_size,
                       frozen_stages=tuple(frozen_bn), **overrides, **lowering.layers)


def frozen_parts(config, model) -> set[str]:
  """The parts of `model` that config.model.frozen names (ConfigError for an unknown one)."""
  try:
    return models.expand_parts(config.model.frozen, model.parts)
  except ValueError as e:
    raise ConfigError(f"config key 'model.frozen': {e}") from None


def total_steps(config, steps_per_epoch: int) -> int:
  """The run's length in steps; ConfigError when it does not fit the int32 step counter."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  steps = math.ceil(config.num_epochs * steps_per_epoch)
  if steps > MAX_STEPS:
    raise ConfigError(f"config key 'num_epochs'={config.num_epochs!r}: expected at most "
                      f"{MAX_STEPS // steps_per_epoch:,} epochs ({steps_per_epoch} steps each; "
                      "the step counter is int32)")
  return steps


def eval_interval(config, steps_per_epoch: int) -> int:
  """Steps between evaluations: eval_every_steps when set, else eval_every_epochs."""
  if config.eval_every_steps > 0:
    return config.eval_every_steps
  return max(1, int(round(config.eval_every_epochs * steps_per_epoch)))


def check_durations(config, steps_per_epoch: int, steps_total: int) -> list[str]:
  """Durations in epochs that only make sense against the run's length: ConfigError for an
  evaluation interval under one step; warnings (returned) for a warm-up that never ends."""
  every = config.eval_every_epochs * steps_per_epoch
  if config.eval_every_steps <= 0 and every < 1:
    raise ConfigError(f"config key 'eval_every_epochs'={config.eval_every_epochs!r}: expected "
                      f"at least one step's worth ({1 / steps_per_epoch:.4g} epochs at "
                      f"{steps_per_epoch} steps per epoch)")
  sched = config.schedule
  warmup = sched.warmup_steps or round(sched.warmup_epochs * steps_per_epoch)
  if warmup >= steps_total:
    return [f"warning: the warm-up ({warmup} steps: schedule.warmup_"
            f"{'steps' if sched.warmup_steps else 'epochs'}) is as long as the run "
            f"({steps_total} steps): training ends before the learning rate reaches its peak"]
  return []


@dataclasses.dataclass
class Run:
  """Everything a loop needs, built once: the compiled steps take and return `state`."""
  config: Any
  inputs: Inputs
  mesh: Mesh
  lowering: lowering_lib.Lowering
  model: Any
  schedule: Callable
  tx: Any
  total_steps: int
  init_fn: Callable                 # () -> TrainState, to jit or eval_shape
  abstract_state: Any
  state_sharding: Any
  train_step: Callable              # jitted (state, batch) -> (state, metrics), donates state
  eval_steps: dict[str, Callable]   # "eval" (and "eval_ema"): jitted (state, batch) -> sums
  # model.unfreeze_step > 0: the step from then on (the frozen parts' BatchNorm trains too)
  unfrozen_train_step: Callable | None = None

  def train_step_at(self, step: int) -> Callable:
    """The compiled step for global step `step` (fine-tuning has two phases)."""
    if self.unfrozen_train_step is not None and step >= self.config.model.unfreeze_step:
      return self.unfrozen_train_step
    return self.train_step

  @property
  def batch_sharding(self):
    return mesh_lib.batch_sharding(self.mesh)

  def init_state(self):
    """A fresh state, initialised on the devices in its shardings."""
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)()

  def unjitted_train_step(self, model=None) -> Callable:
    """The config's train step, un-jitted, for `model` (default: this run's)."""
    return make_train_step(self.config, model or self.model, self.tx, self.schedule,
                           self.inputs)


def make_train_step(config, model, tx, schedule, inputs: Inputs) -> Callable:
  """The un-jitted train step a config asks for (loss, accumulation, EMA, NaN policy)."""
  return steps.make_train_step(model, tx, schedule, num_classes=inputs.num_classes,
                               label_smoothing=config.optimizer.label_smoothing,
                               mean=inputs.mean, std=inputs.std,
                               skip_nonfinite=config.nan_policy == "skip",
                               grad_accum_steps=config.optimizer.grad_accum_steps,
                               ema_decay=config.optimizer.ema_decay,
                               grad_norm_groups=config.log_grad_norms,
                               loss=config.optimizer.loss,
                               bce_target_threshold=config.optimizer.bce_target_threshold,
                               mixup_alpha=config.data.mixup_alpha,
                               cutmix_alpha=config.data.cutmix_alpha)


def build(config, inputs: Inputs, *, mesh: Mesh | None = None,
          lowering: lowering_lib.Lowering | None = None,
          model_name: str = "", dtype: str = "") -> Run:
  """Model, optimizer, abstract state and its shardings, and the jitted steps for `config`
  on `inputs`. `mesh` defaults to every device (config.mesh), `lowering` to config.lowering;
  `model_name` / `dtype` override the config's (the benchmark's flags)."""
  mesh = mesh if mesh is not None else mesh_lib.create_mesh(config.mesh)
  lowering = lowering or lowering_lib.choose(config.lowering)
  model = create_model(config.model, inputs.num_classes, lowering, name=model_name,
                       dtype=dtype)
  frozen = frozen_parts(config, model)
  unfrozen_model = None
  if frozen - {"head"}:
    # Frozen parts' BatchNorm keeps its statistics (inference mode) while they are frozen.
    unfrozen_model = model
    model = model.clone(frozen_stages=tuple(sorted(frozen - {"head"})))
  steps_total = total_steps(config, inputs.steps_per_epoch)
  schedule = optimizer.create_schedule(config.optimizer, config.schedule,
                                       steps_per_epoch=inputs.steps_per_epoch,
                                       total_steps=steps_total)
  try:
    tx = optimizer.create_optimizer(config.optimizer, schedule, model_parts=model.parts,
                                    frozen=tuple(config.model.frozen),
                                    unfreeze_step=config.model.unfreeze_step)
  except ValueError as e:   # an unknown part in optimizer.lr_multipliers
    raise ConfigError(str(e)) from None
  # Abstract state first: it gives the shardings, the jitted init and the restore target.
  use_ema = config.optimizer.ema_decay > 0
  init_fn = state_lib.make_init_fn(model, tx, (1,) + tuple(inputs.image_shape), config.seed,
                                   ema=use_ema)
  abstract_state = jax.eval_shape(init_fn)
  state_sharding = mesh_lib.state_shardings(abstract_state, mesh)
  batch_sharding, replicated = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  def jit_train_step(model):
    return lowering.jit(make_train_step(config, model, tx, schedule, inputs),
                        in_shardings=(state_sharding, batch_sharding),
                        out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  train_step = jit_train_step(model)
  unfrozen_train_step = (jit_train_step(unfrozen_model)
                         if unfrozen_model is not None and config.model.unfreeze_step > 0
                         else None)
  eval_steps = {
      name: lowering.jit(steps.make_eval_step(model, num_classes=inputs.num_classes,
                                              mean=inputs.mean, std=inputs.std,
                                              use_ema=name == "eval_ema"),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=replicated)
      for name in (("eval", "eval_ema") if use_ema else ("eval",))}
  return Run(config=config, inputs=inputs, mesh=mesh, lowering=lowering, model=model,
             schedule=schedule, tx=tx, total_steps=steps_total, init_fn=init_fn,
             abstract_state=abstract_state, state_sharding=state_sharding,
             train_step=train_step, eval_steps=eval_steps,
             unfrozen_train_step=unfrozen_train_step)


def predictor(model_name: str, num_classes: int, lowering: lowering_lib.Lowering | None = None):
  """(model, jitted `(variables, images) -> logits`) for a named model in inference mode:
  what `predict` and weight checks run, with the same lowering choice as training."""
  lowering = lowering or lowering_lib.choose("auto")
  model = models.create(model_name, num_classes=num_classes, **lowering.layers)
  return model, lowering.jit(lambda variables, images: model.apply(variables, images,
                                                                   train=False))
