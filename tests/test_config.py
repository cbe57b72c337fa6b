"""Config files, overrides and their errors: one line naming the key, non-zero exit."""

import os

import pytest

from resnet_jax import config_cli
from resnet_jax.config_schema import base_config, check_keys_and_types, check_values
from resnet_jax.errors import ConfigError

from conftest import DEFAULT_CONFIG, REPO, run_cli

CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_shipped_config_is_valid(name):
  cfg = config_cli.load_config_file(os.path.join(REPO, "configs", name))
  check_keys_and_types(cfg)
  check_values(cfg, num_devices=1, num_processes=1)


def test_overrides_are_typed_by_the_schema():
  cfg = config_cli.load_config_file(DEFAULT_CONFIG)
  config_cli.apply_overrides(cfg, {"data.batch_size": "32", "optimizer.learning_rate": "1e-2",
                                   "optimizer.nesterov": "false", "schedule.decay_epochs": "3,6",
                                   "model.name": "resnet8"})
  assert cfg.data.batch_size == 32 and isinstance(cfg.data.batch_size, int)
  assert cfg.optimizer.learning_rate == 0.01
  assert cfg.optimizer.nesterov is False
  assert cfg.schedule.decay_epochs == (3.0, 6.0)
  assert cfg.model.name == "resnet8"


@pytest.mark.parametrize("overrides,culprit", [
    ({"data.batchsize": "3"}, "data.batchsize"),
    ({"optimiser.learning_rate": "3"}, "optimiser.learning_rate"),
    ({"data.batch_size": "abc"}, "data.batch_size"),
    ({"optimizer.nesterov": "maybe"}, "optimizer.nesterov"),
    ({"num_epochs": "ten"}, "num_epochs"),
])
def test_bad_overrides_name_the_key(overrides, culprit):
  cfg = config_cli.load_config_file(DEFAULT_CONFIG)
  with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
    config_cli.apply_overrides(cfg, overrides)


@pytest.mark.parametrize("key,value,devices,culprit", [
    ("data.batch_size", 100, 8, "data.batch_size"),     # not divisible by 8 devices
    ("data.batch_size", 0, 1, "data.batch_size"),
    ("model.name", "resnet51", 1, "model.name"),
    ("data.dataset", "imagenet3000", 1, "data.dataset"),
    ("schedule.name", "linear", 1, "schedule.name"),
    ("optimizer.momentum", 1.5, 1, "optimizer.momentum"),
    ("mesh.data", 4, 8, "mesh.data"),
    ("model.dtype", "float8", 1, "model.dtype"),
])
def test_impossible_values_name_the_key(key, value, devices, culprit):
  cfg = base_config()
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
    check_values(cfg, num_devices=devices, num_processes=1)


def test_unknown_key_set_inside_a_config_file_is_caught():
  cfg = base_config()
  cfg.optimizer.lr = 0.1  # a typo a config file could make
  with pytest.raises(ConfigError, match=r"optimizer\.lr.*did you mean"):
    check_keys_and_types(cfg)


def test_cli_typo_exits_nonzero_with_one_clear_line(tmp_path):
  proc = run_cli(["--config=configs/digits_resnet20.py", "--config.optimizer.learning_rat=0.1",
                  f"--workdir={tmp_path}/w"])
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == ("resnet_jax: error: unknown config key 'optimizer.learning_rat' "
                       "(did you mean 'optimizer.learning_rate'?)")
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w"), "nothing may be written for a bad config"


def test_cli_batch_not_divisible_by_devices(tmp_path):
  proc = run_cli(["--config=configs/digits_resnet20.py", "--config.data.batch_size=60",
                  f"--workdir={tmp_path}/w"], devices=8)
  assert proc.returncode == 2
  assert "'data.batch_size'=60" in proc.stderr and "8" in proc.stderr.splitlines()[-1]


def test_launch_sh_missing_config_file(tmp_path):
  import subprocess
  proc = subprocess.run([os.path.join(REPO, "launch.sh"), "configs/nope.py"],
                        capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 2 and "configs/nope.py" in proc.stderr
