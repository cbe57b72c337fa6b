"""ResNet-50 on ImageNet against AlgoPerf's target (MLCommons algorithmic-efficiency,
workload imagenet_resnet): 77.431% validation top-1 (error 0.22569; test, on ImageNet-v2:
error 0.3440), within the workload's 63,008 s budget on its reference hardware (8 x V100).
The workload fixes the model (ResNet-50 v1.5), the data (random-resized crops of 224, scale
0.08-1, flips; eval 224 of 256) and the targets; the training algorithm is the submitter's.
Ours here is the standard one (not AlgoPerf's target-setting run): Nesterov SGD, batch 1024,
learning rate 0.4 (0.1 per 256) after 5 warm-up epochs, cosine decay, weight decay 1e-4 on
kernels, label smoothing 0.1, each block's last BN scale at zero, bf16 compute, 100 epochs.
Such recipes are published at about 77% after 90 epochs (NVIDIA: 77.1), so the target is a
stretch for it: AlgoPerf's targets are meant to be hard.

Target: 77.43% validation top-1. Not yet run with this code (no ImageNet or accelerator
here); no GPU measurement of the step exists yet from which to project an epoch time.

  ./launch.sh configs/imagenet_algoperf.py --config.data.manual_dir=/data/ilsvrc2012
"""

from resnet_jax.config_schema import base_config
from resnet_jax.data.catalog import imagenet_data

BATCH = 1024


def get_config():
  config = base_config()
  config.model.name = "resnet50"
  config.model.dtype = "bfloat16"
  config.model.zero_init_last_bn = True
  imagenet_data(config, batch_size=BATCH)

  config.optimizer.name = "sgd"
  config.optimizer.nesterov = True
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.1 * BATCH / 256
  config.optimizer.weight_decay = 1e-4
  config.optimizer.label_smoothing = 0.1
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 5.0

  config.num_epochs = 100.0
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 1251   # one epoch at batch 1024
  return config
