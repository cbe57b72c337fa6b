"""ResNet-50 on ImageNet as torchvision trained its IMAGENET1K_V1 weights (torchvision's
references/classification: `--model resnet50`, 8 GPUs x 32 images, `--lr 0.1`, step decay
`--lr-step-size 30 --lr-gamma 0.1`, 90 epochs): SGD momentum 0.9, weight decay 1e-4 (here
on conv/dense kernels only: torchvision decays every parameter), batch 256, random-resized
crops of 224 with flips, eval 224 of 256 bilinear, fp32.

Published: 76.13% top-1 (torchvision's ResNet50_Weights.IMAGENET1K_V1). Not yet run with
this code (no ImageNet or accelerator here); no GPU measurement of the step exists yet from
which to project an epoch time.

  ./launch.sh configs/imagenet_torchvision_v1.py --config.data.manual_dir=/data/ilsvrc2012
"""

from resnet_jax.config_schema import base_config
from resnet_jax.data.catalog import imagenet_data

BATCH = 256


def get_config():
  config = base_config()
  config.model.name = "resnet50"
  imagenet_data(config, batch_size=BATCH)

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "step"
  config.schedule.decay_epochs = (30.0, 60.0)
  config.schedule.decay_factor = 0.1

  config.num_epochs = 90.0
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 5004   # one epoch at batch 256
  return config
