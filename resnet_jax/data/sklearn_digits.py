"""TFDS builder for the handwritten digits that ship inside scikit-learn.

1,797 real 8x8 greyscale scans (UCI optdigits, 16 grey levels), so the default experiment
runs offline and still flows through exactly the same TFDS pipeline as ImageNet.
Importing this module registers the builder under the name "sklearn_digits".
"""

import numpy as np
import tensorflow_datasets as tfds

# A fixed, stratified 80/20 hold-out split: the same test images on every machine.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(SPLIT_SEED)
  train, test = [], []
  for label in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == label))
    n_test = int(round(len(idx) * TEST_FRACTION))
    test.extend(idx[:n_test])
    train.extend(idx[n_test:])
  return {"train": np.sort(train), "test": np.sort(test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits (UCI optdigits test set) as an 8x8x1 uint8 image dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split with seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    from sklearn.datasets import load_digits
    digits = load_digits()
    # 16 grey levels -> full uint8 range, so the usual /255 normalisation applies.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    return {name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in split_indices(labels).items()}

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      yield int(index), {"image": image, "label": int(label)}
