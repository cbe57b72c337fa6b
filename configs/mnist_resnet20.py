"""CIFAR-style ResNet-20 on MNIST or Fashion-MNIST (28x28 grey, 60k train / 10k test), through
TFDS's own `mnist` / `fashion_mnist` builders.

  ./launch.sh configs/mnist_resnet20.py                  # MNIST
  ./launch.sh configs/mnist_resnet20.py:fashion_mnist    # Fashion-MNIST
  ./launch.sh configs/mnist_resnet20.py:fashion_mnist --config.data.manual_dir=DIR

Data: TFDS downloads the four official files on first use; offline, put them in a folder
(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) and pass it as data.manual_dir.

Recipe: 15 epochs of batch 128 (7,020 steps), SGD + Nesterov 0.9, lr 0.1 after one warm-up
epoch, cosine decay, weight decay 5e-4; 2-pixel pad-crop, and left-right flips for
Fashion-MNIST only (a flipped digit is another symbol).

Measured (held-out test top-1, seed 0, from the official files via data.manual_dir, on the
2-core CPU development machine; the README's results table has the wall times):
  MNIST          99.71%  ./launch.sh configs/mnist_resnet20.py --config.data.manual_dir=DIR
  Fashion-MNIST  93.90%  the same with configs/mnist_resnet20.py:fashion_mnist
"""

from resnet_jax.config_schema import base_config

DATASETS = ("mnist", "fashion_mnist")


def get_config(dataset: str = "mnist"):
  if dataset not in DATASETS:
    raise ValueError(f"expected one of {', '.join(DATASETS)}, got {dataset!r}")
  config = base_config()
  config.model.name = "resnet20"
  config.data.dataset = dataset
  config.data.batch_size = 128
  config.data.eval_batch_size = 500
  config.data.crop_padding = 2
  config.data.random_flip = dataset == "fashion_mnist"   # clothes are left-right symmetric
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
