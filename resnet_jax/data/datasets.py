"""How to get a prepared TFDS builder for a dataset of the catalog (catalog.py)."""

import os

import tensorflow_datasets as tfds

from resnet_jax.data import image_folder
from resnet_jax.data import sklearn_digits  # noqa: F401  (registers the builder)
from resnet_jax.data.catalog import DATASETS, MANUAL_FILES, DatasetSpec, normalization  # noqa: F401
from resnet_jax.errors import ConfigError


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
