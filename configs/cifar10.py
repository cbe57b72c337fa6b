"""The ResNet paper's CIFAR-10 experiments (He et al. 2015, "Deep Residual Learning for Image
Recognition", Sec. 4.2): Table 6, Fig. 6 (plain vs residual), one config for every depth.

  ./launch.sh configs/cifar10.py:resnet20          # option A (parameter-free) shortcuts
  ./launch.sh configs/cifar10.py:resnet56_b        # option B (projection where width grows)
  ./launch.sh configs/cifar10.py:plain56           # the same net without shortcuts
  ./launch.sh configs/cifar10.py:resnet110         # 0.01 warm-up for 400 steps, as the paper
  ./launch.sh configs/cifar10.py:resnet20,jpeg     # the JPEG copy instead of TFDS's CIFAR-10
  ./launch.sh configs/cifar10.py:resnet20 --config.num_train_steps=3000 \\
      --config.schedule.decay_steps=1500,2250       # a compressed schedule (B = 3000)

Arguments: MODEL[,jpeg]; MODEL is resnet{20,32,44,56,110,1202}, their option-B twins
resnetN_b, or the plain twins plain{20,32,44,56,110,1202} (and the 8-layer members, for
quick tests).

Recipe (the paper's): batch 128, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1,
divided by 10 at 32k and 48k iterations, stopped at 64k; 4-pixel zero pad, random 32x32
crop and horizontal flip; per-channel mean/std normalisation; the 10k test images single-
view. ResNet-110 and -1202 start at 0.01 until the training error is below 80% ("about 400
iterations"): 400 steps here. Trained on all 50k training images (the paper chose the
schedule on a 45k/5k split).

Data: TFDS's `cifar10`, downloaded on first use (or from cifar-10-binary.tar.gz in
data.manual_dir). ",jpeg" reads the JPEG re-encoding of CIFAR-10 (train.tar / test.tar of
<class>/<image> folders, lossy: mean pixel difference ~5.8/255 from the originals) as an
image folder from $RESNET_JAX_DATA/cifar10_jpeg (default ~/resnet_jax_data/cifar10_jpeg),
or from data.image_folder.

The paper's test error (%), option A, Table 6:
  ResNet-20 8.75, ResNet-32 7.51, ResNet-44 7.17, ResNet-56 6.97, ResNet-110 6.43 (best of
  5; mean 6.61 +- 0.16), ResNet-1202 7.93.
Measured with this code (experiments/degradation/README.md has the commands and hardware):
at a 2,000-iteration budget (3% of the paper's schedule, JPEG copy, 2-core CPU), ResNet-20
25.6%, ResNet-56 40.1%, plain-20 32.1%, plain-56 69.4%. The full 64k schedule has not been
run with this code.
"""

import os
import re

from resnet_jax.config_schema import base_config, data_root

DEPTHS = (8, 20, 32, 44, 56, 110, 1202)
MODELS = tuple(f"{kind}{d}{suffix}" for d in DEPTHS
               for kind, suffix in (("resnet", ""), ("resnet", "_b"), ("plain", "")))
STEPS_PER_DECAY = (32_000, 48_000)
TOTAL_STEPS = 64_000


def get_config(arg: str = "resnet20"):
  model, _, source = arg.partition(",")
  if model not in MODELS:
    raise ValueError(f"expected MODEL[,jpeg] with MODEL one of {', '.join(MODELS)}; "
                     f"got {arg!r}")
  if source not in ("", "jpeg"):
    raise ValueError(f"expected MODEL or MODEL,jpeg; got {arg!r}")
  config = base_config()
  config.model.name = model
  if source == "jpeg":
    config.data.dataset = "image_folder"
    config.data.image_folder = os.path.join(data_root(), "cifar10_jpeg")
    config.data.image_size = 32
    config.data.mean = (125.3, 123.0, 113.9)     # CIFAR-10's, as the TFDS dataset's default
    config.data.std = (63.0, 62.1, 66.7)
  else:
    config.data.dataset = "cifar10"
  config.data.batch_size = 128
  config.data.eval_batch_size = 500
  config.data.crop_padding = 4
  config.data.random_flip = True
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "step"
  config.schedule.decay_steps = STEPS_PER_DECAY
  config.num_train_steps = TOTAL_STEPS
  if int(re.search(r"\d+", model).group()) >= 110:
    config.schedule.warmup_steps = 400
    config.schedule.warmup_shape = "constant"
    config.schedule.warmup_factor = 0.1
  config.eval_every_epochs = 4.0
  config.log_every_steps = 100
  config.checkpoint.every_steps = 2000
  return config
