"""The ResNet paper's CIFAR-10 recipe (He et al. 2015, Sec. 4.2) for ResNet-20, on the JPEG
copy of CIFAR-10 in ../shared/data/cifar10_jpeg (read as a user's image folder: the
<split>.tar archives are decoded and checked once when the dataset is prepared).

  ./launch.sh configs/cifar10_jpeg_resnet20.py
  ./launch.sh configs/cifar10_jpeg_resnet20.py --config.model.name=resnet56

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
48k iterations, stop at 64k (= epochs 82, 123, 164 at 391 steps/epoch); 4-pixel pad-crop
and horizontal flips. The paper reports 8.75% test error for ResNet-20 on the original
images; this copy is lossy JPEG, so expect slightly different numbers. Hours on a CPU.
"""

import os

from resnet_jax.config_schema import base_config

_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def get_config():
  config = base_config()
  config.model.name = "resnet20"
  config.data.dataset = "image_folder"
  config.data.image_folder = os.path.normpath(os.path.join(_SHARED, "cifar10_jpeg"))
  config.data.image_size = 32
  config.data.mean = (125.3, 123.0, 113.9)
  config.data.std = (63.0, 62.1, 66.7)
  config.data.batch_size = 128
  config.data.eval_batch_size = 500
  config.data.crop_padding = 4
  config.data.random_flip = True
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "step"
  config.schedule.decay_epochs = (82.0, 123.0)
  config.num_epochs = 164.0
  config.eval_every_epochs = 4.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 2000
  return config
