"""Every ImageNet recipe in configs/ runs end to end -- TFDS's imagenet2012 builder on a
tiny fake ILSVRC2012 (the official tars' layout, real photos), its optimizer, schedule,
augmentations and loss, training steps, a checkpoint, and an evaluation of every validation
image -- with only the model and the sizes shrunk (resnet8, 32-px crops, batch 4)."""

import json
import os

import pytest

from resnet_jax import config_cli, main as cli

from conftest import REPO
from test_imagenet_preprocess import _fake_ilsvrc2012

RECIPES = ["imagenet_torchvision_v1", "imagenet_resnet50", "imagenet_mlperf",
           "imagenet_rsb_a3", "imagenet_algoperf"]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
  """(manual_dir, data_dir): the fake tars, prepared once for every recipe."""
  root = tmp_path_factory.mktemp("imagenet")
  _fake_ilsvrc2012(str(root / "manual"))
  return str(root / "manual"), str(root / "tfds")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end_on_a_fake_ilsvrc2012(recipe, fake_imagenet, tmp_path, capsys):
  manual, data_dir = fake_imagenet
  path = os.path.join(REPO, "configs", f"{recipe}.py")
  config = config_cli.load_config_file(path)
  eval_size = 48 if config.data.eval_image_size else 0   # keeps a train/test size split
  code = cli.main([f"--config={path}", f"--config.data.manual_dir={manual}",
                   f"--config.data.data_dir={data_dir}", "--config.model.name=resnet8",
                   "--config.model.dtype=float32", "--config.data.image_size=32",
                   f"--config.data.eval_image_size={eval_size}",
                   "--config.data.batch_size=4", "--config.data.eval_batch_size=2",
                   "--config.data.shuffle_buffer=8", "--config.num_train_steps=3",
                   "--config.schedule.warmup_epochs=0.5", "--config.eval_every_epochs=100",
                   f"--workdir={tmp_path}/work"])
  captured = capsys.readouterr()
  assert code == 0, captured.err[-3000:]
  results = json.load(open(tmp_path / "work" / "results.json"))
  assert results["step"] == 3 and results["examples"] == 5     # every validation image
  recorded = json.load(open(tmp_path / "work" / "config.json"))
  assert recorded["optimizer"]["name"] == config.optimizer.name   # the recipe's own
  assert os.listdir(tmp_path / "work" / "checkpoints")
