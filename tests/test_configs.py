"""Every experiment in configs/ loads, with every argument it takes, and passes the schema's
checks; none names a development folder; the CIFAR-10 config builds every row of the
paper's Table 6 (shapes only: compiling ResNet-1202 takes minutes)."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import config_cli, models
from resnet_jax.errors import ConfigError
from resnet_jax.config_schema import check_keys_and_types, check_values

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _arguments(path) -> list[str | None]:
  """None for a plain get_config(), else every argument a parametrised config lists."""
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for listing in ("MODELS", "DATASETS"):
    if hasattr(module, listing):
      return list(getattr(module, listing))
  return [None]


CASES = [(os.path.basename(p), arg) for p in CONFIGS for arg in _arguments(p)]


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_every_config_and_argument_passes_the_schema(name, arg):
  path = os.path.join(REPO, "configs", name) + (f":{arg}" if arg else "")
  config = config_cli.load_config_file(path)
  check_keys_and_types(config)
  batch = config.data.batch_size
  check_values(config, num_devices=1, num_processes=1)
  assert batch > 0 and config.model.name in models.MODEL_SPECS


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_no_config_names_a_development_folder(path):
  """Data locations come from config keys, TFDS's own directories or $RESNET_JAX_DATA."""
  text = open(path).read()
  assert "shared" not in text and "/work" not in text and "../" not in text


def test_config_arguments_are_checked_in_one_line():
  with pytest.raises(ConfigError, match=r"get_config\('resnet21'\) failed: "
                                                    r"ValueError: expected MODEL\[,jpeg\]"):
    config_cli.load_config_file(os.path.join(REPO, "configs", "cifar10.py:resnet21"))


# He et al. 2015, Table 6: parameters of the option-A nets (printed rounded).
TABLE_6 = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
           "resnet110": 1.7, "resnet1202": 19.4}


@pytest.mark.parametrize("model", sorted(TABLE_6))
def test_the_cifar10_config_builds_every_row_of_table_6(model):
  config = config_cli.load_config_file(os.path.join(REPO, "configs", f"cifar10.py:{model}"))
  assert model in models.MODEL_SPECS
  assert config.data.dataset == "cifar10" and config.num_train_steps == 64_000
  assert tuple(config.schedule.decay_steps) == (32_000, 48_000)
  warm = model in ("resnet110", "resnet1202")
  assert (config.schedule.warmup_steps, config.schedule.warmup_shape) == (
      (400, "constant") if warm else (0, "linear"))
  net = models.create(config.model.name, num_classes=10)
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert round(params / 1e6, 2 if params < 1e6 else 1) == TABLE_6[model]
