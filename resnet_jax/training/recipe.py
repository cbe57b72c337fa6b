"""What a config's `model` and `optimizer` sections build: the model and the un-jitted train
step. One construction for the trainer and the benchmark, so both train and time the same
thing; kept apart from trainer.py so the benchmark does not import the input pipeline
(TensorFlow) for synthetic runs."""

from resnet_jax import models
from resnet_jax.training import steps


def create_model(model_cfg, num_classes: int, name: str = "", dtype: str = ""):
  """The model a config's `model` section describes (`name`/`dtype` override its own)."""
  overrides = {} if model_cfg.se_ratio < 0 else {"se_ratio": model_cfg.se_ratio}
  if model_cfg.bn_epsilon > 0:   # else the model's own (Keras-layout weights: 1.001e-5)
    overrides["bn_epsilon"] = model_cfg.bn_epsilon
  return models.create(name or model_cfg.name, num_classes=num_classes,
                       dtype=dtype or model_cfg.dtype,
                       drop_path_rate=model_cfg.drop_path_rate, **overrides,
                       zero_init_last_bn=model_cfg.zero_init_last_bn,
                       bn_momentum=model_cfg.bn_momentum,
                       bn_group_size=model_cfg.bn_group_size)


def make_train_step(config, model, tx, schedule, num_classes: int, mean, std):
  """The un-jitted train step a config asks for (loss, accumulation, EMA, NaN policy)."""
  return steps.make_train_step(model, tx, schedule, num_classes=num_classes,
                               label_smoothing=config.optimizer.label_smoothing,
                               mean=mean, std=std,
                               skip_nonfinite=config.nan_policy == "skip",
                               grad_accum_steps=config.optimizer.grad_accum_steps,
                               ema_decay=config.optimizer.ema_decay)
