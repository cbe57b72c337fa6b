"""CIFAR-style ResNet-20 on fashion-mnist (28x28 grey), prepared by TFDS's own `fashion_mnist` builder
from the official files in ../shared/data/fashion_mnist (no download).

  ./launch.sh configs/fashion_mnist_resnet20.py
  ./launch.sh configs/fashion_mnist_resnet20.py --config.data.manual_dir=/path/to/fashion_mnist/files
"""

import os

from resnet_jax.config_schema import base_config

_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def get_config():
  config = base_config()
  config.model.name = "resnet20"
  config.data.dataset = "fashion_mnist"
  config.data.manual_dir = os.path.normpath(os.path.join(_SHARED, "fashion_mnist"))
  config.data.batch_size = 128
  config.data.eval_batch_size = 500
  config.data.crop_padding = 2
  config.data.random_flip = True   # clothes are left-right symmetric
  config.optimizer.learning_rate = 0.1
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 1.0
  config.num_epochs = 15.0
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 1000
  return config
