"""ResNet-50 v1.5 on ImageNet with LARS, as the MLPerf Training reference (mlcommons/training,
image_classification, TensorFlow 2, v1.0; its TPU command for batch 4096): LARS with base
learning rate 10.0, momentum 0.9, epsilon 0, trust coefficient 0.001, weight decay 2e-4
(BN and biases excluded from decay and adaptation), 5 warm-up epochs then polynomial decay
(power 2) to 1e-4, label smoothing 0.1, 42 epochs, evaluation every 4 epochs; bf16 compute.

Target: 75.9% top-1 (MLPerf's quality target; runs stop on reaching it). Not yet run with
this code (no ImageNet or accelerator here); no GPU measurement of the step exists yet from
which to project an epoch time.

  ./launch.sh configs/imagenet_mlperf.py --config.data.manual_dir=/data/ilsvrc2012
"""

from resnet_jax.config_schema import base_config
from resnet_jax.data.catalog import imagenet_data

BATCH = 4096


def get_config():
  config = base_config()
  config.model.name = "resnet50"
  config.model.dtype = "bfloat16"
  imagenet_data(config, batch_size=BATCH)

  config.optimizer.name = "lars"
  config.optimizer.learning_rate = 10.0
  config.optimizer.momentum = 0.9
  config.optimizer.trust_coefficient = 0.001
  config.optimizer.weight_decay = 2e-4
  config.optimizer.label_smoothing = 0.1
  config.schedule.name = "poly"
  config.schedule.poly_power = 2.0
  config.schedule.end_learning_rate = 1e-4
  config.schedule.warmup_epochs = 5.0

  config.num_epochs = 42.0
  config.eval_every_epochs = 4.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 1251   # four epochs at batch 4096
  return config
