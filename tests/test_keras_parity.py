"""Our v1 / v2 ResNets are Keras Applications' ResNet50/101/152 and ResNet50V2/101V2/152V2:
same parameter counts, and the same logits (max |delta| <= 1e-4, fp32, eval mode) from the
same random weights through our Keras converter. No download: Keras builds weights=None.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")   # before keras is imported anywhere

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from resnet_jax import models  # noqa: E402
from resnet_jax.convert import keras_layout  # noqa: E402

keras = pytest.importorskip("keras")

# keras.applications' model.count_params() (trainable + BN moving statistics), 1000 classes,
# as printed by Keras' own summary: the published figures for these models.
KERAS_TOTAL = {"resnet50_v1": 25_636_712, "resnet101_v1": 44_707_176,
               "resnet152_v1": 60_419_944, "resnet50_v2": 25_613_800,
               "resnet101_v2": 44_675_560, "resnet152_v2": 60_380_648}
# The deeper nets are compared at 64x64 to keep the suite fast; every layer and every stride
# is still exercised (the final map is 2x2).
INPUT_SIZE = {"resnet50_v1": 224, "resnet50_v2": 224}


def _randomise(keras_model, seed):
  """Non-trivial weights everywhere, BN statistics and conv biases included, so a swapped
  or misplaced tensor cannot hide behind an identity initialisation."""
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if isinstance(layer, keras.layers.BatchNormalization):
      c = weights[0].shape
      weights = [rng.uniform(0.5, 1.0, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                 rng.uniform(1.0, 2.0, c)]
    else:
      weights = [weights[0]] + [rng.normal(0, 0.01, b.shape) for b in weights[1:]]
    layer.set_weights([w.astype(np.float32) for w in weights])


def _count(tree):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(KERAS_TOTAL))
def test_logits_and_parameter_counts_equal_keras(name):
  size = INPUT_SIZE.get(name, 64)
  keras_model = keras_layout.build_keras_model(name, num_classes=1000, input_size=size)
  _randomise(keras_model, seed=len(name))
  assert keras_model.count_params() == KERAS_TOTAL[name]

  variables = keras_layout.from_keras_model(keras_model, name)
  model = models.create(name, num_classes=1000)
  x = np.random.default_rng(0).normal(0, 1, (2, size, size, 3)).astype(np.float32)
  # Every one of our variables must come from Keras, with its shape, and nothing else.
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, dict(expected))
  trainable = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
  assert _count(variables["params"]) == trainable
  assert _count(variables) == KERAS_TOTAL[name]

  ours = np.asarray(model.apply(variables, x))
  theirs = np.asarray(keras_model(x, training=False))
  assert np.abs(theirs).max() > 0.1          # logits carry signal
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_keras_weights_for_another_flavour_are_refused_naming_the_variable():
  keras_model = keras_layout.build_keras_model("resnet50_v1", num_classes=10, input_size=32)
  with pytest.raises(ValueError, match=r"do not fit resnet50_v2 at \[.*: resnet50_v2 has"):
    keras_layout.from_keras_model(keras_model, "resnet50_v2")
