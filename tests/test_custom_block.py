"""docs/models.md, "Add your own block", as a test: a block defined in this file and one
registry row are all it takes to train a new kind of ResNet with the real trainer (same
data pipeline, steps, checkpoints). Keep the two in step."""

import flax.linen as nn
import jax
import numpy as np

from resnet_jax import models
from resnet_jax.config_cli import resolve
from resnet_jax.config_schema import check_values
from resnet_jax.models.blocks import ResidualBlock, last_bn_scale_init
from resnet_jax.training import trainer

from conftest import DEFAULT_CONFIG, read_checkpoint


# --- the docs' example, verbatim ---------------------------------------------------------
class SeparableBlock(ResidualBlock):
  """Depthwise 3x3 then pointwise 1x1, twice: a MobileNet-style branch."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(x.shape[-1], (3, 3), self.strides, padding=1,
                  feature_group_count=x.shape[-1], name="depthwise1")(x)
    y = self.act(self.norm(name="bn1")(self.conv(self.filters, (1, 1), name="pointwise1")(y)))
    y = self.conv(self.filters, (3, 3), padding=1, feature_group_count=self.filters,
                  name="depthwise2")(y)
    y = self.conv(self.filters, (1, 1), name="pointwise2")(y)
    y = self.norm(name="bn2", scale_init=last_bn_scale_init(self.zero_init_last_bn))(y)
    return self.join(y, x)     # squeeze-excite, drop path, the shortcut and the activation


models.register("sepnet20", **dict(models.MODEL_SPECS["resnet20"], block=SeparableBlock))
# -------------------------------------------------------------------------------------------


def test_a_block_defined_here_trains_with_the_trainer(data_dir, tmp_path):
  config, _ = resolve(DEFAULT_CONFIG, {"model.name": "sepnet20",
                                       "data.data_dir": data_dir,
                                       "num_epochs": "5", "schedule.warmup_epochs": "1",
                                       "eval_every_epochs": "5"})
  check_values(config, num_devices=jax.device_count(), num_processes=1)
  workdir = str(tmp_path / "sepnet20")
  result = trainer.train_and_evaluate(config, workdir)
  # 5 epochs of the 8x8 digits (110 steps): far above chance (10%).
  assert result["top1"] > 0.8, result
  params = read_checkpoint(workdir, result["step"])["params"]
  block = params["stage2_block1"]
  assert block["depthwise1"]["kernel"].shape == (3, 3, 1, 16)     # one filter per channel
  assert block["pointwise1"]["kernel"].shape == (1, 1, 16, 32)
  assert "shortcut" not in block          # the row's option-A shortcut: no parameters
  assert np.isfinite(result["loss"])
