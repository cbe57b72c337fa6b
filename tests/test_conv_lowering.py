"""The CPU lowerings compute the same numbers as the straightforward path ("native":
lax.conv_general_dilated, nn.max_pool, flax's BatchNorm, all differentiated by JAX), to
float32 rounding, forward and backward:

  "cpu":    1x1 convs as matrix products, strided dx by phases, dw over a materialised
            input, Eigen rather than YNNPACK convolutions; pool.py's max-pool gradient;
            batch_norm.py's closed-form gradient;
  "onednn": the same around oneDNN convolutions and BatchNorm sums from
            resnet_jax/cpu_kernels (whose own tests are tests/test_cpu_kernels.py).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import cpu_kernels, models
from resnet_jax.models import batch_norm, conv, pool

CPU_IMPLS = ["cpu", "onednn"]


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _close(a, b, rtol=2e-5):
  """max |a - b| relative to max |a|: float32 rounding of sums of a few thousand terms."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.max(jnp.abs(x))) or 1.0
    err = float(jnp.max(jnp.abs(x - y))) / scale
    assert err <= rtol, (err, x.shape)


def test_auto_is_a_cpu_lowering_on_the_cpu_backend_and_impls_are_checked():
  assert jax.default_backend() == "cpu"
  # "onednn" wherever its kernels build (tests/test_cpu_kernels.py insists they do here).
  assert conv.resolve_impl("auto") == ("onednn" if cpu_kernels.available() else "cpu")
  assert conv.resolve_impl("native") == "native" and conv.resolve_impl("cpu") == "cpu"
  with pytest.raises(ValueError, match="unknown conv impl"):
    conv.set_impl("winograd")
  with conv.use_impl("native"):
    assert conv.resolve_impl() == "native"
  assert conv.get_impl() == "auto"


@pytest.mark.parametrize("kernel,strides,padding,hw", [
    (1, 1, "VALID", (9, 9)),             # bottleneck 1x1
    (1, 2, "VALID", (9, 10)),            # projection shortcut, odd size
    (3, 1, "SAME", (9, 9)),
    (3, 2, ((1, 1), (1, 1)), (10, 10)),  # strided 3x3 (torchvision padding)
    (3, 2, ((1, 1), (1, 1)), (9, 11)),   # odd sizes: phases of unequal length
    (7, 2, ((3, 3), (3, 3)), (15, 16)),  # the ImageNet stem's shape, 6 channels: phases
    (7, 2, ((3, 3), (3, 3)), (15, 17, 3)),  # ... and RGB
    (3, 1, ((1, 1), (1, 1)), (9, 9, 1)),    # greyscale CIFAR-style stem
    (5, 3, ((2, 1), (0, 3)), (13, 12)),  # asymmetric padding, stride 3
    (2, 2, "VALID", (8, 8)),             # a tap set that misses some phases entirely
])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_conv_forward_and_gradients_match_native(kernel, strides, padding, hw, impl):
  rng = np.random.default_rng(kernel * 10 + strides)
  channels = hw[2] if len(hw) == 3 else 6
  x, w = _rand(rng, 2, *hw[:2], channels), _rand(rng, kernel, kernel, channels, 5)
  cotangent = None

  def run(impl):
    def f(x, w):
      return conv.conv2d(x, w, (strides, strides), padding, impl=impl)
    y, vjp = jax.vjp(f, x, w)
    nonlocal cotangent
    cotangent = _rand(rng, *y.shape) if cotangent is None else cotangent
    return y, vjp(cotangent)

  y_ref, grads_ref = run("native")
  y, grads = run(impl)
  assert y.shape == y_ref.shape
  _close(y_ref, y)
  _close(grads_ref, grads)


def test_materialised_input_is_bit_identical():
  # dw reads x through a product with the identity (conv._materialised): x * 1 plus zeros.
  rng = np.random.default_rng(4)
  x = jnp.maximum(_rand(rng, 2, 5, 5, 16) * 1e3, 0) + _rand(rng, 2, 5, 5, 16) * 1e-30
  np.testing.assert_array_equal(jax.jit(conv._materialised)(x), x)


def test_cpu_lowering_compiles_convolutions_outside_ynnpack():
  assert conv.compiler_options("native") is None
  options = conv.compiler_options("cpu")
  assert options and "CONVOLUTION" not in options["xla_cpu_experimental_ynn_fusion_type"]
  x, w = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))  # big enough for YNNPACK
  f = lambda x, w: conv.conv2d(x, w, impl="cpu")  # noqa: E731

  default = jax.jit(f).lower(x, w).compile().as_text()
  ours = jax.jit(f, compiler_options=options).lower(x, w).compile().as_text()
  assert _convolutions_in_ynn(default) == 1    # the premise: by default YNNPACK takes it
  assert _convolutions_in_ynn(ours) == 0 and "convolution(" in ours


def _convolutions_in_ynn(hlo: str) -> int:
  """How many YNNPACK fusions of a compiled module's text compute a convolution."""
  callees = re.findall(r"calls=%([\w.]+), .*__ynn_fusion", hlo)
  bodies = [re.search(rf"^%{re.escape(c)} \(.*?^}}", hlo, re.S | re.M).group(0)
            for c in callees]
  return sum("convolution(" in body for body in bodies)


def test_grouped_and_dilated_convs_keep_the_native_path():
  # The CPU lowering only covers what ResNets use densely; groups (ResNeXt) stay native.
  rng = np.random.default_rng(0)
  x, w = _rand(rng, 1, 8, 8, 8), _rand(rng, 3, 3, 2, 8)
  y = conv.conv2d(x, w, (1, 1), "SAME", feature_group_count=4, impl="cpu")
  _close(conv.conv2d(x, w, (1, 1), "SAME", feature_group_count=4, impl="native"), y)


def test_max_pool_gradient_picks_the_first_maximum_like_select_and_scatter():
  # Post-ReLU activations rounded to 1 decimal: many exact ties, inside windows and zeros.
  rng = np.random.default_rng(1)
  x = jnp.asarray(np.maximum(rng.standard_normal((2, 17, 16, 5)), 0).round(1), jnp.float32)
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  weights = jnp.arange(1.0, 6.0)

  def loss(x, impl):
    return jnp.sum(jnp.sin(pool.max_pool(x, (3, 3), (2, 2), impl=impl)) * weights)

  for impl in CPU_IMPLS:
    np.testing.assert_array_equal(pool.max_pool(x, impl="native"), pool.max_pool(x, impl=impl))
    np.testing.assert_array_equal(jax.grad(loss)(x, "native"), jax.grad(loss)(x, impl))


def test_batch_norm_matches_flax_in_every_lowering():
  rng = np.random.default_rng(2)
  x = _rand(rng, 4, 5, 6, 7) * 3 + 1
  params = {"scale": _rand(rng, 7) + 2, "bias": _rand(rng, 7)}
  stats = {"mean": _rand(rng, 7), "var": jnp.abs(_rand(rng, 7)) + 1}
  weights = jnp.arange(7.0)

  def run(module, impl):
    def loss(p, x):
      y, new = module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y) * weights), new
    with conv.use_impl(impl):
      (value, new), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    evaluated = module.clone(use_running_average=True).apply(
        {"params": params, "batch_stats": stats}, x)
    return value, new, grads, evaluated

  kwargs = dict(use_running_average=False, momentum=0.9, epsilon=1e-5)
  reference = run(nn.BatchNorm(**kwargs), "native")
  for impl in ("native", "cpu"):
    _close(reference, run(batch_norm.BatchNorm(**kwargs), impl), rtol=1e-6)
  # "onednn" sums in another order (double accumulators), so it is not bit-compatible with
  # flax's float32 sums: measured here, flax's loss is 5.5e-7 (relative) off a float64
  # evaluation and onednn's 4.5e-7 off on the other side, 1.0e-6 apart. Its sums are
  # checked against float64 directly in tests/test_cpu_kernels.py.
  _close(reference, run(batch_norm.BatchNorm(**kwargs), "onednn"), rtol=2e-6)


def test_batch_norm_has_flax_variable_names():
  x = jnp.ones((2, 3, 3, 4))
  ours = batch_norm.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
  theirs = nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)


def _max_rel_err(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) / (float(jnp.max(jnp.abs(x))) or 1.0)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ResNet-50 with BN in inference form (an affine map per channel): at a testable size its
# train-mode BN (16 values per channel in stage 4) would drown the comparison in its own
# sensitivity (measured: 24% gradient changes from a few-ulp input nudge). Its 1x1s,
# strided phases and max pool are what it adds over ResNet-18; BN's gradient is covered
# in train mode by the others and by test_batch_norm_matches_flax_in_every_lowering.
@pytest.mark.parametrize("name,size,train", [("resnet18", 64, True), ("resnet50", 64, False),
                                             ("resnet20", 32, True)])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_whole_train_step_gradients_match_native(name, size, train, impl):
  """Loss, every parameter gradient and the new BN statistics of one jitted training
  forward and backward: the path a train step takes, through every layer type.

  How close is "the same to float32 rounding" for a whole deep net? A tiny ResNet-50 batch
  (4 images of 64px: BN over 16 values per channel in stage 4) amplifies rounding a lot:
  measured, perturbing the input by 1e-6 moves the native path's logits by ~2e-4 and some
  gradients by percents. So the yardstick is the native path's own sensitivity: the CPU
  lowering may differ from it by no more than the native path differs from itself under an
  input perturbation of float32 rounding size (x10), or 1e-4. A wrong tap, phase or
  statistic is an O(1) error and fails either way."""
  model = models.create(name, num_classes=10)
  rng = np.random.default_rng(3)
  x = _rand(rng, 4, size, size, 3)
  nudged = x * (1 + 2.0**-22 * _rand(rng, *x.shape))   # a few ulps per pixel
  labels = jnp.arange(4) % 10
  variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)

  def loss_and_grads(variables, x, impl):
    # Compiled as the trainer compiles it, with the lowering's XLA options.
    return jax.jit(functools.partial(_loss_and_grads, impl=impl),
                   compiler_options=conv.compiler_options(impl))(variables, x)

  def _loss_and_grads(variables, x, impl):
    def loss(p):
      with conv.use_impl(impl):
        logits, new = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                  train=train, mutable=["batch_stats"])
      onehot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), new
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])

  reference = loss_and_grads(variables, x, "native")
  sensitivity = _max_rel_err(reference, loss_and_grads(variables, nudged, "native"))
  error = _max_rel_err(reference, loss_and_grads(variables, x, impl))
  assert error <= max(1e-4, 10 * sensitivity), (error, sensitivity)
