"""The pure steps: one train step moves params and BN stats; eval masks padding exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.config_schema import base_config
from resnet_jax.training import optimizer, state as state_lib, steps

MEAN, STD = (127.5,), (64.0,)


def _setup(num_classes=10):
  cfg = base_config()
  model = models.create("resnet8", num_classes=num_classes)
  schedule = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=10,
                                       total_steps=100)
  tx = optimizer.create_optimizer(cfg.optimizer, schedule)
  state = state_lib.make_init_fn(model, tx, (1, 8, 8, 1), seed=0)()
  return cfg, model, schedule, tx, state


def _batch(n=16, seed=0, num_classes=10):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, 8, 8, 1)).astype(np.uint8),
          "label": rng.randint(0, num_classes, (n,)).astype(np.int32)}


def test_train_step_changes_params_and_batch_stats():
  cfg, model, schedule, tx, state = _setup()
  train_step = jax.jit(steps.make_train_step(model, tx, schedule, num_classes=10,
                                             label_smoothing=0.1, mean=MEAN, std=STD))
  new_state, metrics = train_step(state, _batch())
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
  assert all(jax.tree.leaves(changed)), "every parameter should receive a gradient update"
  stats_changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.batch_stats,
                               new_state.batch_stats)
  assert all(jax.tree.leaves(stats_changed)), "BN running statistics must be updated"


def test_weight_decay_skips_batchnorm_and_biases():
  _, _, _, _, state = _setup()
  mask = optimizer.decay_mask(state.params)
  flat = {"/".join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["head/kernel"] and not flat["head/bias"]
  assert flat["stem_conv/kernel"] and not flat["stem_bn/scale"] and not flat["stem_bn/bias"]


def test_the_train_step_loss_is_label_smoothed_cross_entropy_written_out():
  """The step's loss against the formula by hand, on the logits the step's forward pass
  computes: targets (1 - eps) on the label plus eps / K on every class (Szegedy et al.)."""
  _, model, schedule, tx, state = _setup()
  batch = _batch()
  logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          steps.normalize(batch["image"], MEAN, STD), train=True,
                          mutable=["batch_stats"])
  log_p = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
  k, labels = 10, batch["label"]
  losses = {}
  for eps in (0.0, 0.1, 0.4):
    targets = np.full((len(labels), k), eps / k)
    targets[np.arange(len(labels)), labels] += 1 - eps
    expected = float(np.mean(-np.sum(targets * log_p, -1)))
    step = jax.jit(steps.make_train_step(model, tx, schedule, num_classes=k,
                                         label_smoothing=eps, mean=MEAN, std=STD))
    losses[eps] = float(step(state, batch)[1]["loss"])
    assert np.isclose(losses[eps], expected, rtol=1e-5), (eps, losses[eps], expected)
  assert len(set(losses.values())) == 3   # the smoothing is applied, not ignored


def test_eval_step_counts_only_masked_in_examples():
  _, model, _, _, state = _setup()
  eval_step = jax.jit(steps.make_eval_step(model, num_classes=10, mean=MEAN, std=STD))
  batch = _batch(8)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       steps.normalize(batch["image"], MEAN, STD), train=False)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
  out = jax.device_get(eval_step(state, dict(batch, mask=mask)))
  pred = np.argmax(np.asarray(logits), -1)
  assert out["count"] == 5
  assert out["top1_correct"] == np.sum((pred == batch["label"])[:5])
  top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
  assert out["top5_correct"] == sum(batch["label"][i] in top5[i] for i in range(5))


def test_schedules_hit_their_landmarks():
  cfg = base_config()
  cfg.optimizer.learning_rate = 0.4
  cfg.schedule.warmup_epochs = 1.0
  cosine = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=10,
                                     total_steps=100)
  assert float(cosine(0)) == 0.0 and np.isclose(float(cosine(10)), 0.4)
  assert float(cosine(100)) < 1e-6
  cfg.schedule.name = "step"
  cfg.schedule.decay_epochs = (3.0, 6.0)
  step = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=10,
                                   total_steps=100)
  assert np.isclose(float(step(5)), 0.2)           # half-way through warmup
  assert np.isclose(float(step(29)), 0.4)
  assert np.isclose(float(step(30)), 0.04)          # boundaries are absolute steps
  assert np.isclose(float(step(60)), 0.004)


def test_the_papers_cifar_schedule_in_steps_with_a_constant_warm_up():
  """ResNet-110's recipe (He et al. 2015): 0.01 until step 400, then 0.1, divided by 10 at
  32k and 48k iterations: every boundary in absolute steps."""
  cfg = base_config()
  cfg.schedule.name = "step"
  cfg.schedule.decay_steps = (32_000, 48_000)
  cfg.schedule.decay_epochs = (1.0,)          # ignored: decay_steps is set
  cfg.schedule.warmup_steps = 400
  cfg.schedule.warmup_shape = "constant"
  cfg.schedule.warmup_factor = 0.1
  lr = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=390,
                                 total_steps=64_000)
  expected = {0: 0.01, 399: 0.01, 400: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01,
              48_000: 0.001, 63_999: 0.001}
  for step, value in expected.items():
    assert np.isclose(float(lr(step)), value), (step, float(lr(step)))
  cfg.schedule.name = "cosine"                 # a constant warm-up before a cosine too
  cosine = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=390,
                                     total_steps=1400)
  assert np.isclose(float(cosine(399)), 0.01) and np.isclose(float(cosine(400)), 0.1)
  assert np.isclose(float(cosine(900)), 0.05) and float(cosine(1400)) < 1e-6
