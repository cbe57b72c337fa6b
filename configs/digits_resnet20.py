"""The default experiment: CIFAR-style ResNet-20 on scikit-learn's 8x8 digits.

Runs offline on a 2-core CPU in a few minutes; the data ships with scikit-learn and goes
through our own TFDS builder (resnet_jax/data/sklearn_digits.py).

  ./launch.sh                                   # same as: ./launch.sh configs/digits_resnet20.py
  ./launch.sh configs/digits_resnet20.py --config.num_epochs=10

Expected: >= 97% top-1 on the 359 held-out test digits (see README for the measured run).
"""

from resnet_jax.config_schema import base_config


def get_config():
  config = base_config()
  config.seed = 0
  config.model.name = "resnet20"
  config.data.dataset = "sklearn_digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 128
  config.data.crop_padding = 1         # digits are 8x8: shift by at most one pixel
  config.data.random_flip = False      # a flipped digit is a different symbol
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 2.0
  config.num_epochs = 40.0
  config.eval_every_epochs = 10.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 200
  return config
