"""How to get a prepared TFDS builder for a dataset of the catalog (catalog.py)."""

import os

import tensorflow_datasets as tfds

from resnet_jax.data import image_folder
from resnet_jax.data import sklearn_digits  # noqa: F401  (registers the builder)
from resnet_jax.data.catalog import DATASETS, DatasetSpec, normalization  # noqa: F401
from resnet_jax.errors import ConfigError


def resolve_data_dir(data_dir: str) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def prepare_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The dataset's TFDS builder, prepared in data_dir the first time: by TFDS's own download,
  or from the files in data.manual_dir when it is set (ImageNet: always). Where that fails,
  one line (ConfigError) saying which files data.manual_dir must hold."""
  spec = DATASETS[data_cfg.dataset]
  data_dir = resolve_data_dir(data_cfg.data_dir)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ConfigError(f"config key 'data.data_dir': {data_dir} is a file, not a directory")
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
    what = "is not a directory" if os.path.exists(manual_dir) else "does not exist"
    raise ConfigError(f"config key 'data.manual_dir': {manual_dir} {what}")
  needs = (f"{', '.join(spec.files[:-1])} and {spec.files[-1]}" if len(spec.files) > 1
           else "".join(spec.files))
  if spec.manual_only:
    if manual_dir is None or not any(os.path.isfile(os.path.join(manual_dir, f))
                                     for f in spec.files):
      held = f"{manual_dir} holds none of them" if manual_dir else "it is not set"
      raise ConfigError(f"config key 'data.manual_dir': dataset '{data_cfg.dataset}' is "
                        f"prepared from {needs}, which TFDS cannot download; {held}")
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"config key 'data.data_dir': cannot create {data_dir}: {e}") from e
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, extract_dir=_extract_dir(data_dir, spec, manual_dir)))
  except Exception as e:  # noqa: BLE001 -- a failed download or unusable files: say which
    if spec.offline or not spec.files:
      raise
    cause = f"{type(e).__name__}: {first_line(e)}"
    where = (f"{manual_dir} must hold {needs}" if manual_dir else
             f"put {needs} in a folder and set --config.data.manual_dir=FOLDER")
    raise ConfigError(f"dataset '{data_cfg.dataset}' could not be prepared in {data_dir} "
                      f"({cause}); {where}") from e
  return builder


def _extract_dir(data_dir: str, spec, manual_dir: str | None) -> str | None:
  """Where TFDS unpacks the dataset's files: one folder per dataset when they come from
  data.manual_dir. TFDS names a manual file's extracted copy after the file alone
  (downloads/extracted/GZIP.train-images-idx3-ubyte.gz), and MNIST and Fashion-MNIST ship
  files of the same names: in a shared data_dir, Fashion-MNIST was silently prepared from
  MNIST's extracted images (seen: 99.3% "Fashion-MNIST" test accuracy). Downloads are
  named by URL, so they keep TFDS's default."""
  if manual_dir is None:
    return None
  return os.path.join(data_dir, "downloads", "extracted", spec.tfds_name)


def first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ""
