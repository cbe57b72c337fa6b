"""ResNet-50 v1.5 on ImageNet, the NVIDIA / Goyal et al. recipe: 90 epochs of SGD with a
linear warm-up ("Accurate, Large Minibatch SGD", Goyal et al. 2017) and a cosine schedule
with label smoothing ("Bag of Tricks", He et al. 2019), as NVIDIA's DeepLearningExamples
trains its ResNet50 v1.5: momentum 0.875, learning rate 0.256 per 256 images (linear scaling),
5 warm-up epochs, weight decay 1/32768 on conv/dense kernels only, label smoothing 0.1;
random-resized crops of 224 with flips, eval 224 of 256. Plus what we add for speed:
bf16 compute (fp32 params and BN), and each block's last BN scale starting at zero.

Published: 77.1% top-1 after 90 epochs (NVIDIA's ResNet50 v1.5 README, mixed precision).
Not yet run with this code (no ImageNet or accelerator here); no GPU measurement of the
step exists yet from which to project an epoch time.

  ./launch.sh configs/imagenet_resnet50.py --config.data.manual_dir=/data/ilsvrc2012

Data: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in data.manual_dir (default
~/tensorflow_datasets/downloads/manual); the first run prepares TFDS's imagenet2012 (hours,
~150 GB, once). See docs/scale.md.
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
  config.optimizer.learning_rate = 0.256 * BATCH / 256
  config.optimizer.momentum = 0.875
  config.optimizer.weight_decay = 1 / 32768
  config.optimizer.label_smoothing = 0.1
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 5.0

  config.num_epochs = 90.0
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 1251   # one epoch at batch 1024
  return config
