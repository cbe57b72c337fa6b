"""ResNet-50 on ImageNet (ILSVRC2012), the standard 90-epoch recipe (Goyal et al. 2017, "Accurate,
Large Minibatch SGD"; with the cosine schedule and label smoothing of He et al. 2019, "Bag of
Tricks"): batch 1024, SGD momentum 0.9 (no Nesterov), lr 0.1 x 1024/256 = 0.4 after a 5-epoch
linear warmup, cosine decay to 0, weight decay 1e-4 on kernels, label smoothing 0.1, zero-init
of each block's last BN scale, bf16 compute. Published runs of this recipe reach about
76.5-77% top-1 (not yet run with this code).

  ./launch.sh configs/imagenet_resnet50.py
  ./launch.sh configs/imagenet_resnet50.py --config.data.manual_dir=/data/ilsvrc2012

The data: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in
data.manual_dir (default ~/tensorflow_datasets/downloads/manual, TFDS's own default). The first
run prepares TFDS's `imagenet2012` from them in data.data_dir (hours, ~150 GB, once); the images
stay JPEG-encoded and are cropped with data/imagenet_preprocess.py: train random-resized crop to
224 + flip, eval resize to 256 + center crop 224.

Each process reads its own 1/N of the split (process_sharding="split"): reading ImageNet once
per process would not scale. The shuffle buffer mixes 16k encoded images (~1.8 GB) per process;
the TFDS train split is itself stored shuffled. See experiments/input_pipeline.md for how many
CPU cores per accelerator the preprocessing needs.
"""

from resnet_jax.config_schema import base_config

BATCH = 1024


def get_config():
  config = base_config()
  config.model.name = "resnet50"
  config.model.dtype = "bfloat16"
  config.model.zero_init_last_bn = True

  config.data.dataset = "imagenet2012"
  config.data.manual_dir = "~/tensorflow_datasets/downloads/manual"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.preprocess = "imagenet"
  config.data.image_size = 224
  config.data.crop_pct = 0.875
  config.data.random_flip = True
  config.data.batch_size = BATCH
  config.data.eval_batch_size = 0        # = batch_size; the last batch is padded and masked
  config.data.process_sharding = "split"
  config.data.shuffle_buffer = 16_384
  config.data.cache = False              # 1.28M encoded images do not fit in host memory

  config.optimizer.learning_rate = 0.1 * BATCH / 256
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4
  config.optimizer.label_smoothing = 0.1
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 5.0

  config.num_epochs = 90.0
  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 1251   # one epoch at batch 1024
  return config
