"""Every named depth has exactly the reference parameter count (no real init: eval_shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models

# torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in m.parameters())
TORCHVISION_1000 = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# He et al. 2015, Table 6 (10 classes, option-A shortcuts): 0.27M .. 19.4M, printed rounded.
PAPER_CIFAR_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                 "resnet110": 1.7, "resnet1202": 19.4}
# Exact counts, pinned so a change of the architecture is noticed.
CIFAR_EXACT = {"resnet8": 75_290, "resnet20": 269_722, "resnet32": 464_154,
               "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962,
               "resnet1202": 19_421_274}


def param_count(name, num_classes, size):
  model = models.create(name, num_classes=num_classes)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, size, size, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name,expected", sorted(TORCHVISION_1000.items()))
def test_imagenet_param_counts_equal_torchvision(name, expected):
  assert param_count(name, 1000, 224) == expected


@pytest.mark.parametrize("name,expected", sorted(CIFAR_EXACT.items()))
def test_cifar_param_counts(name, expected):
  count = param_count(name, 10, 32)
  assert count == expected
  if name in PAPER_CIFAR_M:
    # The paper prints two significant digits.
    assert round(count / 1e6, 2 if count < 1e6 else 1) == PAPER_CIFAR_M[name]


def test_every_registered_name_builds_and_runs_forward():
  for name in models.list_models():
    size = 64 if models.MODEL_SPECS[name]["stem"] == "imagenet" else 16
    model = models.create(name, num_classes=7)
    out = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.PRNGKey(0), x)[0],
                         jnp.zeros((2, size, size, 3)))
    assert out.shape == (2, 7), name


def test_small_forward_is_finite_and_batch_independent_in_eval():
  model = models.create("resnet8", num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  full = model.apply(variables, x, train=False)
  single = model.apply(variables, x[:1], train=False)
  assert np.all(np.isfinite(full))
  np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-5)


def test_zero_pad_shortcut_has_no_params_and_projection_does():
  a = param_count("resnet20", 10, 32)
  b_model = models.create("resnet20", num_classes=10, shortcut="projection")
  v = jax.eval_shape(b_model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  b = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
  # Two projection shortcuts (16->32, 32->64): 1x1 conv + BN scale/bias each.
  assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_bfloat16_compute_keeps_fp32_params_and_logits():
  model = models.create("resnet8", num_classes=10, dtype="bfloat16")
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert model.apply(variables, x).dtype == jnp.float32


def test_unknown_model_name_is_reported():
  with pytest.raises(KeyError, match="resnet51"):
    models.create("resnet51", num_classes=10)
