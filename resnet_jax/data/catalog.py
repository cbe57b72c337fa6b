"""The datasets we know: what each is called in TFDS, its statistics, and its quirks.

Plain data, no TensorFlow: the config checks read it before anything heavy is imported.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  tfds_name: str
  # Per-channel normalisation in 0..255 units, applied on device.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # Whether TFDS can prepare it with no manual files and no network.
  offline: bool = False
  # The files TFDS prepares it from: downloaded, or found in data.manual_dir.
  files: tuple[str, ...] = ()
  # Whether TFDS cannot download it at all (data.manual_dir must hold `files`).
  manual_only: bool = False
  # Images of many sizes: batches need data.preprocess="imagenet" (crop to image_size).
  variable_size: bool = False
  # Splits whose labels are all -1 (not for evaluation).
  unlabeled_splits: tuple[str, ...] = ()


# The official files, as TFDS's mnist and fashion_mnist builders name them.
_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

DATASETS = {
    "sklearn_digits": DatasetSpec("sklearn_digits", mean=(78.0,), std=(96.0,), offline=True),
    "mnist": DatasetSpec("mnist", mean=(33.3,), std=(78.6,), files=_MNIST_FILES),
    "fashion_mnist": DatasetSpec("fashion_mnist", mean=(72.9,), std=(90.0,),
                                 files=_MNIST_FILES),
    "cifar10": DatasetSpec("cifar10", mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7),
                           files=("cifar-10-binary.tar.gz",)),
    "cifar100": DatasetSpec("cifar100", mean=(129.3, 124.1, 112.4), std=(68.2, 65.4, 70.4),
                            files=("cifar-100-binary.tar.gz",)),
    # A user's folder of images (see image_folder.py); ImageNet statistics unless the config
    # sets data.mean / data.std.
    "image_folder": DatasetSpec("image_folder", mean=(123.7, 116.3, 103.5),
                                std=(58.4, 57.1, 57.4), offline=True),
    # ILSVRC2012 through TFDS's own builder, prepared from the official tars in
    # data.manual_dir (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar). Examples stay
    # JPEG-encoded; imagenet_preprocess.py crops them. torchvision's statistics.
    "imagenet2012": DatasetSpec("imagenet2012", mean=(123.675, 116.28, 103.53),
                                std=(58.395, 57.12, 57.375), variable_size=True,
                                unlabeled_splits=("test",), manual_only=True,
                                files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")),
}


def normalization(data_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) in 0..255 units, in the batches' channel order: the config's when set
  (taken as given), else the dataset's (RGB, reversed for channel_order "BGR")."""
  spec = DATASETS[data_cfg.dataset]
  if tuple(data_cfg.std) != (0.0,):
    return tuple(data_cfg.mean), tuple(data_cfg.std)
  if data_cfg.channel_order == "BGR":
    return spec.mean[::-1], spec.std[::-1]
  return spec.mean, spec.std


def imagenet_data(config, *, batch_size: int, image_size: int = 224) -> None:
  """Set `config.data` for ILSVRC2012 as every ImageNet recipe reads it: TFDS's
  imagenet2012 prepared from the official tars in data.manual_dir (TFDS's default folder),
  train on "train", evaluate every one of the 50,000 "validation" images, random-resized
  crops of `image_size` with flips, eval resize + center crop (data.crop_pct), each process
  reading its own 1/N of the split (reading ImageNet once per process would not scale), a
  16k-image shuffle buffer (~1.8 GB of encoded images per process) and no in-memory cache
  (1.28M encoded images do not fit). Recipes then set what differs between them."""
  data = config.data
  data.dataset = "imagenet2012"
  data.manual_dir = "~/tensorflow_datasets/downloads/manual"
  data.train_split = "train"
  data.eval_split = "validation"
  data.preprocess = "imagenet"
  data.image_size = image_size
  data.crop_pct = 0.875
  data.random_flip = True
  data.batch_size = batch_size
  data.eval_batch_size = 0        # = batch_size; the last batch is padded and masked
  data.process_sharding = "split"
  data.shuffle_buffer = 16_384
  data.cache = False
