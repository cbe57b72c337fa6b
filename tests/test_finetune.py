"""Fine-tuning as in Keras' transfer-learning guide, with the real trainer on real digits:
frozen parts (model.frozen) keep their params and BatchNorm statistics bitwise through
training, per-part learning rates, and two phases in one run (head first, then everything
from model.unfreeze_step), resumable like any run."""

import jax
import numpy as np
from flax import traverse_util

from resnet_jax import config_cli, models
from resnet_jax.config_schema import check_values
from resnet_jax.training import setup, trainer

from conftest import DEFAULT_CONFIG, read_checkpoint

COMMON = {"model.name": "resnet8", "num_train_steps": "6", "log_every_steps": "1",
          "eval_every_epochs": "100", "checkpoint.every_steps": "2",
          "schedule.warmup_epochs": "0", "checkpoint.keep": "10"}


def _config(data_dir, **overrides):
  config, _ = config_cli.resolve(DEFAULT_CONFIG, {"data.data_dir": data_dir, **COMMON,
                                                  **overrides})
  check_values(config, num_devices=jax.device_count(), num_processes=1)
  return config


def _initial(config):
  """The state a fresh run of `config` starts from (the init is a function of the seed)."""
  data = setup.prepare_data(config)
  state = setup.build(config, data.inputs).init_state()
  return {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}


def _by_part(tree):
  flat = traverse_util.flatten_dict(tree)
  return {key: value for key, value in flat.items()}, {key: models.part_of(key[0]) for key in flat}


def _compare(saved, initial, frozen):
  """Per leaf: bitwise equal where the part is frozen, changed elsewhere (params)."""
  for collection in ("params", "batch_stats"):
    now, parts = _by_part(saved[collection])
    before, _ = _by_part(initial[collection])
    for key, value in now.items():
      same = np.array_equal(np.asarray(value), np.asarray(before[key]))
      if parts[key] in frozen:
        assert same, (collection, key)
      elif collection == "params" and key[-1] in ("kernel", "scale"):
        assert not same, (collection, key)


def test_frozen_parts_and_their_batch_norm_statistics_are_bitwise_unchanged(data_dir,
                                                                             tmp_path):
  config = _config(data_dir, **{"model.frozen": "stem,stage1",
                                "optimizer.lr_multipliers": "head=10"})
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 6
  _compare(read_checkpoint(str(tmp_path), 6), _initial(config), frozen={"stem", "stage1"})


def test_head_first_then_everything_in_one_resumable_run(data_dir, tmp_path, capsys):
  """model.frozen=body until step 3: at step 2 only the head has moved (BN statistics of
  the body kept too); by step 6 the body trains. Stopped at step 2 and resumed, the run
  ends bitwise where an uninterrupted one does."""
  phases = {"model.frozen": "body", "model.unfreeze_step": "3"}
  config = _config(data_dir, **phases)
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  trainer.train_and_evaluate(config, whole)
  assert "model.frozen parts (body) train from here on" in capsys.readouterr().out
  initial = _initial(config)
  body = {"stem", "stage1", "stage2", "stage3"}
  _compare(read_checkpoint(whole, 2), initial, frozen=body)
  at_end = read_checkpoint(whole, 6)
  assert not np.array_equal(at_end["params"]["stem_conv"]["kernel"],
                            initial["params"]["stem_conv"]["kernel"])
  assert not np.array_equal(at_end["batch_stats"]["stem_bn"]["mean"],
                            initial["batch_stats"]["stem_bn"]["mean"])

  assert trainer.train_and_evaluate(_config(data_dir, **phases, stop_after_steps="2"),
                                    split)["stopped"]
  trainer.train_and_evaluate(_config(data_dir, **phases), split)
  resumed = read_checkpoint(split, 6)
  for collection in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, resumed[collection], at_end[collection])
