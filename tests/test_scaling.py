"""FSDP, ghost BN, gradient accumulation, mixed precision and EMA."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.config_schema import base_config
from resnet_jax.models.batch_norm import BatchNorm
from resnet_jax.training import optimizer, state as state_lib, steps

from conftest import read_metrics, run_cli

MEAN, STD = (127.5,), (64.0,)


def test_fsdp_matches_data_parallel_and_shards_the_params(data_dir, tmp_path):
  """8 devices as data=8 vs data=2 x fsdp=4: same math (losses to 1e-4), and with FSDP each
  device holds about a quarter of the parameter bytes (small tensors stay replicated)."""
  runs = {}
  for fsdp in (1, 4):
    workdir = str(tmp_path / f"fsdp{fsdp}")
    proc = run_cli(["--config=configs/digits_resnet20.py", f"--config.data.data_dir={data_dir}",
                    "--config.num_train_steps=6", "--config.log_every_steps=1",
                    f"--config.mesh.fsdp={fsdp}", "--config.eval_every_epochs=100",
                    f"--workdir={workdir}"], devices=8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"'fsdp': {fsdp}" in proc.stdout
    runs[fsdp] = (json.load(open(os.path.join(workdir, "results.json"))),
                  [m["loss"] for m in read_metrics(workdir)])
  (dp, dp_losses), (fs, fs_losses) = runs[1], runs[4]
  np.testing.assert_allclose(fs_losses, dp_losses, rtol=1e-4)
  assert dp["param_bytes_per_device"] == dp["param_bytes_total"]
  assert fs["param_bytes_total"] == dp["param_bytes_total"]
  assert fs["param_bytes_per_device"] < 0.35 * fs["param_bytes_total"], fs


def test_ghost_bn_with_per_device_groups_reproduces_per_device_statistics():
  """Groups of G contiguous examples are what each of B/G devices holds of a sharded batch:
  compare with BN computed by hand on each such shard."""
  batch, group, channels = 16, 4, 3
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, 5, 5, channels)) * 3 + 1
  bn = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, group_size=group)
  variables = bn.init(jax.random.PRNGKey(1), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  x_np = np.asarray(x, np.float64)
  means, variances = [], []
  for shard in np.split(x_np, batch // group):       # what each device would hold
    mean, var = shard.mean((0, 1, 2)), shard.var((0, 1, 2))
    means.append(mean)
    variances.append(var)
    expected = (shard - mean) / np.sqrt(var + 1e-5)
    start = len(means) - 1
    np.testing.assert_allclose(y[start * group:(start + 1) * group], expected, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * np.mean(means, 0), atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 + 0.1 * np.mean(variances, 0), atol=1e-5)
  # Group = whole batch is ordinary BatchNorm, with the same variable names.
  full, _ = BatchNorm(use_running_average=False, group_size=batch).apply(
      variables, x, mutable=["batch_stats"])
  ref, _ = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).apply(
      variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(full, ref, atol=1e-5)


class _NoBatchNormNet(nn.Module):
  """A small conv net with no BatchNorm: accumulation must then be exact."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.mean((1, 2)))


def _one_step(model, k, batch, ema_decay=0.0):
  cfg = base_config()
  schedule = optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=10,
                                       total_steps=100)
  tx = optimizer.create_optimizer(cfg.optimizer, schedule)
  state = state_lib.make_init_fn(model, tx, (1, 8, 8, 1), seed=0, ema=ema_decay > 0)()
  step = jax.jit(steps.make_train_step(model, tx, schedule, num_classes=10,
                                       label_smoothing=0.0, mean=MEAN, std=STD,
                                       grad_accum_steps=k, ema_decay=ema_decay))
  return state, step


def _batch(n=32, seed=0):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, 8, 8, 1)).astype(np.uint8),
          "label": rng.randint(0, 10, (n,)).astype(np.int32)}


def test_gradient_accumulation_equals_one_big_batch_without_bn():
  model, batch = _NoBatchNormNet(), _batch(32)
  results = {}
  for k in (1, 4):
    state, step = _one_step(model, k, batch)
    for _ in range(3):
      state, metrics = step(state, batch)
    results[k] = (state.params, float(metrics["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               results[4][0], results[1][0])
  np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-5)


def test_gradient_accumulation_with_bn_updates_running_stats_per_micro_batch():
  model, batch = models.create("resnet8", num_classes=10), _batch(32)
  state, step = _one_step(model, 4, batch)
  new_state, _ = step(state, batch)
  mean = new_state.batch_stats["stem_bn"]["mean"]
  # Four momentum-0.9 updates from zero: 1 - 0.9**4 of the (per-micro-batch) means.
  micro_means = []
  x = steps.normalize(batch["image"], MEAN, STD)
  for j in range(4):
    micro = x[j::4]
    conv = model.apply({"params": state.params, "batch_stats": state.batch_stats}, micro,
                       method=lambda m, v: nn.Conv(16, (3, 3), padding=[(1, 1), (1, 1)],
                                                   use_bias=False).apply(
                           {"params": state.params["stem_conv"]}, v))
    micro_means.append(np.asarray(conv).mean((0, 1, 2)))
  expected = 0.0
  for m in micro_means:
    expected = 0.9 * expected + 0.1 * m
  np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-6)


def test_bfloat16_step_keeps_fp32_master_params_and_bn_stats():
  batch = _batch(16)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model = models.create("resnet8", num_classes=10, dtype=dtype)
    state, step = _one_step(model, 1, batch)
    new_state, metrics = step(state, batch)
    floats = [x for x in jax.tree.leaves((new_state.params, new_state.batch_stats,
                                          new_state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    losses[dtype] = float(metrics["loss"])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_ema_follows_its_recurrence():
  model, batch = _NoBatchNormNet(), _batch(16)
  state, step = _one_step(model, 1, batch, ema_decay=0.5)
  expected = state.params
  for i in range(3):
    state, _ = step(state, _batch(16, seed=i))
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, expected, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.ema_params,
               expected)


def test_ema_is_evaluated_alongside_raw_weights(data_dir, tmp_path):
  workdir = str(tmp_path)
  proc = run_cli(["--config=configs/digits_resnet20.py", f"--config.data.data_dir={data_dir}",
                  "--config.model.name=resnet8", "--config.num_train_steps=10",
                  "--config.optimizer.ema_decay=0.9", "--config.optimizer.grad_accum_steps=2",
                  f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [m["step"] for m in read_metrics(workdir, "eval_ema")] == [10]
  assert read_metrics(workdir, "eval_ema")[0]["examples"] == 359
