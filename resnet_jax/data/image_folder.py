"""TFDS builder for a user's own images: <root>/<split>/<class>/<file> (or <root>/<split>.tar
holding <split>/<class>/<file>), e.g. ../shared/data/cifar10_jpeg.

Every file is decoded once when the dataset is prepared, so a corrupt image is found there,
not in the middle of a training run: it is skipped and counted (the list is kept in the
dataset's metadata and printed), or, with corrupt="error", preparation stops naming it.
The policy is part of the prepared copy's identity (like the image size): a folder prepared
with one policy is prepared again, in its own place, when used with the other.

Two ways to store the examples:
  - decoded (default): resized to image_size x image_size and re-encoded losslessly (PNG),
    which makes the prepared copy deterministic and lets the pipeline batch them as they are;
  - keep_encoded=True: the original file bytes, any size, for the ImageNet-style pipeline
    (imagenet_preprocess.py), which crops and resizes at train time from the encoded bytes.
"""

import hashlib
import os
import tarfile

import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
CORRUPT_POLICIES = ("skip", "error")   # config key data.corrupt_images


class CorruptImageError(ConfigError):
  pass


def _list_split(root: str, split: str) -> list[tuple[str, str, callable]]:
  """[(class name, file name for messages, read-bytes fn)] for one split, sorted."""
  folder, archive = os.path.join(root, split), os.path.join(root, f"{split}.tar")
  items = []
  if os.path.isdir(folder):
    for cls in sorted(os.listdir(folder)):
      cdir = os.path.join(folder, cls)
      if os.path.isdir(cdir):
        for name in sorted(os.listdir(cdir)):
          if name.lower().endswith(IMAGE_SUFFIXES):
            path = os.path.join(cdir, name)
            items.append((cls, path, lambda p=path: open(p, "rb").read()))
  elif os.path.isfile(archive):
    with tarfile.open(archive) as tar:
      members = [m for m in tar.getmembers()
                 if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)]
    for m in sorted(members, key=lambda m: m.name):
      parts = m.name.split("/")
      if len(parts) >= 2:
        items.append((parts[-2], f"{archive}:{m.name}", lambda n=m.name: _read_member(archive, n)))
  return items


_OPEN_TARS: dict = {}


def _read_member(archive, name):
  if archive not in _OPEN_TARS:
    _OPEN_TARS[archive] = tarfile.open(archive)
  return _OPEN_TARS[archive].extractfile(name).read()


def find_splits(root: str) -> list[str]:
  if not os.path.isdir(root):
    return []
  names = {e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))}
  names |= {e[:-4] for e in os.listdir(root) if e.endswith(".tar")}
  return sorted(names)


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, root_dir: str, image_size: int, corrupt: str,
               keep_encoded: bool = False, **kwargs):
    if corrupt not in CORRUPT_POLICIES:
      raise ValueError(f"corrupt={corrupt!r}; expected one of {CORRUPT_POLICIES}")
    self._root_dir = os.path.abspath(os.path.expanduser(root_dir))
    self._image_size = image_size
    self._corrupt = corrupt
    self._keep_encoded = keep_encoded
    # Encoded copies do not depend on image_size: one prepared copy serves every crop size.
    variant = "encoded" if keep_encoded else str(image_size)
    # The corrupt-file policy only acts at preparation, so it is part of the copy's identity:
    # a copy prepared with "skip" must not satisfy "error" (that would never stop), and the
    # other way round. "skip" (the default) keeps the name copies had before the policy
    # counted, so those are still reused.
    if corrupt != "skip":
      variant += f"|corrupt={corrupt}"
    digest = hashlib.sha1(f"{self._root_dir}|{variant}".encode()).hexdigest()[:10]
    name = f"{os.path.basename(self._root_dir.rstrip('/')) or 'root'}_{digest}".lower()
    config = tfds.core.BuilderConfig(name="".join(c if c.isalnum() else "_" for c in name))
    super().__init__(config=config, **kwargs)

  def _splits(self) -> dict[str, list]:
    """{split: its images} for the splits that have any (listed once: a tar's index is read
    whole). Folders without <class>/<image> inside are not splits."""
    if getattr(self, "_listing", None) is None:
      listing = {split: _list_split(self._root_dir, split)
                 for split in find_splits(self._root_dir)}
      self._listing = {split: items for split, items in listing.items() if items}
    return self._listing

  def _class_names(self):
    if not find_splits(self._root_dir):
      raise ConfigError(f"config key 'data.image_folder': {self._root_dir} has no <split>/ "
                        "folders or <split>.tar archives")
    classes = sorted({cls for items in self._splits().values() for cls, _, _ in items})
    if not classes:
      raise ConfigError(f"config key 'data.image_folder': no images under {self._root_dir} "
                        "(expected <split>/<class>/<image>)")
    return classes

  def _info(self):
    size = self._image_size
    if self._keep_encoded:
      # The original bytes pass through unchanged (TFDS stores bytes as given; the format
      # name is only a default for arrays, which we never pass).
      image = tfds.features.Image(shape=(None, None, 3))
    else:
      image = tfds.features.Image(shape=(size, size, 3))
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": image,
            "label": tfds.features.ClassLabel(names=self._class_names()),
            "file": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    self.info.metadata["skipped_files"] = []
    return {split: self._generate_examples(split) for split in self._splits()}

  def _decode(self, data: bytes):
    """What is stored for one file; decoding it here is also what finds corrupt files."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    if self._keep_encoded:
      return data
    size = self._image_size
    if image.shape[:2] != (size, size):
      image = tf.image.resize(image, (size, size), antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image.numpy()

  def _generate_examples(self, split):
    skipped = self.info.metadata["skipped_files"]
    for cls, name, read in self._splits()[split]:
      try:
        image = self._decode(read())
      except (tf.errors.InvalidArgumentError, OSError, ValueError) as e:
        if self._corrupt == "error":
          raise CorruptImageError(
              f"corrupt image file {name}: {str(e).splitlines()[0][:120]} "
              "(set --config.data.corrupt_images=skip to skip such files)") from None
        skipped.append(name)
        continue
      yield name, {"image": image, "label": cls, "file": name}


def skipped_files(builder) -> list[str]:
  return list(builder.info.metadata.get("skipped_files", [])) if builder.info.metadata else []


