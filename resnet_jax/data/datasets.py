"""Which datasets we know, and how to get a prepared TFDS builder for one."""

import dataclasses
import os

import tensorflow_datasets as tfds

from resnet_jax.config_schema import ConfigError
from resnet_jax.data import image_folder
from resnet_jax.data import sklearn_digits  # noqa: F401  (registers the builder)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  tfds_name: str
  # Per-channel normalisation in 0..255 units, applied on device.
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # Whether TFDS can prepare it with no manual files and no network.
  offline: bool = False
  # Images of many sizes: batches need data.preprocess="imagenet" (crop to image_size).
  variable_size: bool = False
  # Splits whose labels are all -1 (not for evaluation).
  unlabeled_splits: tuple[str, ...] = ()


DATASETS = {
    "sklearn_digits": DatasetSpec("sklearn_digits", mean=(78.0,), std=(96.0,), offline=True),
    "mnist": DatasetSpec("mnist", mean=(33.3,), std=(78.6,)),
    "fashion_mnist": DatasetSpec("fashion_mnist", mean=(72.9,), std=(90.0,)),
    "cifar10": DatasetSpec("cifar10", mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7)),
    "cifar100": DatasetSpec("cifar100", mean=(129.3, 124.1, 112.4), std=(68.2, 65.4, 70.4)),
    # A user's folder of images (see image_folder.py); ImageNet statistics unless the config
    # sets data.mean / data.std.
    "image_folder": DatasetSpec("image_folder", mean=(123.7, 116.3, 103.5),
                                std=(58.4, 57.1, 57.4), offline=True),
    # ILSVRC2012 through TFDS's own builder, prepared from the official tars in
    # data.manual_dir (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar). Examples stay
    # JPEG-encoded; imagenet_preprocess.py crops them. torchvision's statistics.
    "imagenet2012": DatasetSpec("imagenet2012", mean=(123.675, 116.28, 103.53),
                                std=(58.395, 57.12, 57.375), variable_size=True,
                                unlabeled_splits=("test",)),
}

# What data.manual_dir must hold (at least one of) to prepare a dataset, where TFDS would
# otherwise fail with a multi-line assertion.
MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
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


def resolve_data_dir(data_dir: str) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def prepare_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The dataset's TFDS builder, prepared in data_dir (from manual_dir files if given)."""
  spec = DATASETS[data_cfg.dataset]
  data_dir = resolve_data_dir(data_cfg.data_dir)
  if data_cfg.dataset == "image_folder":
    if not os.path.isdir(os.path.expanduser(data_cfg.image_folder)):
      raise ConfigError(f"config key 'data.image_folder': {data_cfg.image_folder} "
                        "is not a directory")
    # The ImageNet-style pipeline crops from the encoded bytes: keep the files as they are.
    builder = image_folder.ImageFolder(root_dir=data_cfg.image_folder,
                                       image_size=data_cfg.image_size,
                                       corrupt=data_cfg.corrupt_images, data_dir=data_dir,
                                       keep_encoded=data_cfg.preprocess == "imagenet")
  else:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = os.path.expanduser(data_cfg.manual_dir) if data_cfg.manual_dir else None
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise ConfigError(f"config key 'data.manual_dir': directory {manual_dir} does not exist")
  if manual_dir is None and not spec.offline:
    raise ConfigError(
        f"dataset '{data_cfg.dataset}' is not prepared in {data_dir} and no "
        "data.manual_dir was given to prepare it from (this machine cannot download)")
  needed = MANUAL_FILES.get(data_cfg.dataset, ())
  if needed and not any(os.path.isfile(os.path.join(manual_dir, f)) for f in needed):
    raise ConfigError(f"config key 'data.manual_dir': {manual_dir} holds none of "
                      f"{', '.join(needed)} needed to prepare '{data_cfg.dataset}'")
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"config key 'data.data_dir': cannot create {data_dir}: {e}") from e
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=download_config)
  return builder
