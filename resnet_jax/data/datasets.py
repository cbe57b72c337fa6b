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
}


def normalization(data_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) in 0..255 units: the config's when set, else the dataset's."""
  spec = DATASETS[data_cfg.dataset]
  if tuple(data_cfg.std) != (0.0,):
    return tuple(data_cfg.mean), tuple(data_cfg.std)
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
    builder = image_folder.ImageFolder(root_dir=data_cfg.image_folder,
                                       image_size=data_cfg.image_size,
                                       corrupt=data_cfg.corrupt_images, data_dir=data_dir)
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
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"config key 'data.data_dir': cannot create {data_dir}: {e}") from e
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=download_config)
  return builder
