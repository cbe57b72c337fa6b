"""resnet_jax/cpu_speed through the seam (resnet_jax/lowering.py): the CPU lowerings build
models with flax's own modules and parameters and compute the same numbers as the model's
default layers (lax.conv_general_dilated, nn.max_pool, BatchNorm differentiated by JAX), to
float32 rounding, forward and backward:

  "cpu":    1x1 convs as matrix products, strided dx by phases, dw over a materialised
            input, Eigen rather than YNNPACK convolutions; the max-pool gradient by taps;
            BatchNorm's closed-form gradient;
  "onednn": the same around oneDNN convolutions, BatchNorm sums and max pooling from
            cpu_speed/kernels (whose own tests are tests/test_cpu_kernels.py).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import lowering, models
from resnet_jax.cpu_speed import conv as cpu_conv, kernels
from resnet_jax.cpu_speed import lowering as cpu_lowering
from resnet_jax.models.batch_norm import BatchNorm

CPU_LOWERINGS = ["cpu", "onednn"]


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _close(a, b, rtol=2e-5):
  """max |a - b| relative to max |a|: float32 rounding of sums of a few thousand terms."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.max(jnp.abs(x))) or 1.0
    err = float(jnp.max(jnp.abs(x - y))) / scale
    assert err <= rtol, (err, x.shape)


def test_choose_picks_a_cpu_lowering_on_cpu_and_native_elsewhere():
  assert jax.default_backend() == "cpu"
  # "onednn" wherever its kernels build (tests/test_cpu_kernels.py insists they do here).
  auto = lowering.choose("auto")
  assert auto.name == ("onednn" if kernels.available() else "cpu")
  assert auto.compiler_options == cpu_lowering.compiler_options()
  assert set(auto.layers) == {"conv", "norm", "pool"}
  assert lowering.choose("native") == lowering.Lowering("native")
  assert lowering.choose("auto", backend="gpu") == lowering.Lowering("native")
  with pytest.raises(lowering.LoweringUnavailable, match="CPU backend only, not on 'tpu'"):
    lowering.choose("cpu", backend="tpu")
  with pytest.raises(lowering.LoweringUnavailable, match="unknown lowering 'winograd'"):
    lowering.choose("winograd")


def test_without_the_cpu_speed_package_auto_is_native_and_says_why(monkeypatch):
  monkeypatch.setattr(lowering, "cpu_speed_installed", lambda: False)
  chosen = lowering.choose("auto")
  assert chosen.name == "native" and not chosen.layers and chosen.compiler_options is None
  assert "resnet_jax.cpu_speed is not installed" in chosen.note
  with pytest.raises(lowering.LoweringUnavailable, match="needs the resnet_jax.cpu_speed"):
    lowering.choose("onednn")
  lowering.prepare_process()       # nothing to prepare: returns, no restart


def test_models_built_through_the_seam_have_the_default_variables():
  x = jnp.zeros((1, 32, 32, 3))
  default = models.create("seresnet18", num_classes=10)
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(  # noqa: E731
      m.init, jax.random.PRNGKey(0), x))
  for name in CPU_LOWERINGS:
    fast = models.create("seresnet18", num_classes=10, **cpu_lowering.layers(name))
    assert shapes(fast) == shapes(default)


@pytest.mark.parametrize("kernel,strides,padding,hw", [
    (1, 1, "VALID", (9, 9)),             # bottleneck 1x1, narrowing (6 -> 5)
    (1, 1, "VALID", (9, 9, 4)),          # ... widening (4 -> 5): dw on oneDNN's GEMM
    (1, 2, "VALID", (9, 10)),            # projection shortcut, odd size
    (3, 1, "SAME", (9, 9)),
    (3, 2, ((1, 1), (1, 1)), (10, 10)),  # strided 3x3 (torchvision padding)
    (3, 2, ((1, 1), (1, 1)), (9, 11)),   # odd sizes: phases of unequal length
    (7, 2, ((3, 3), (3, 3)), (15, 16)),  # the ImageNet stem's shape, 6 channels: phases
    (7, 2, ((3, 3), (3, 3)), (15, 17, 3)),  # ... and RGB
    (3, 1, 1, (9, 9, 1)),                # greyscale CIFAR-style stem, int padding
    (5, 3, ((2, 1), (0, 3)), (13, 12)),  # asymmetric padding, stride 3
    (2, 2, "VALID", (8, 8)),             # a tap set that misses some phases entirely
])
@pytest.mark.parametrize("name", CPU_LOWERINGS)
def test_conv_forward_and_gradients_match_flax(kernel, strides, padding, hw, name):
  rng = np.random.default_rng(kernel * 10 + strides)
  channels = hw[2] if len(hw) == 3 else 6
  x = _rand(rng, 2, *hw[:2], channels)
  module = functools.partial(nn.Conv, 5, (kernel, kernel), strides, padding)
  params = module().init(jax.random.PRNGKey(0), x)
  cotangent = None

  def run(conv):
    y, vjp = jax.vjp(lambda p, x: conv.apply(p, x), params, x)
    nonlocal cotangent
    cotangent = _rand(rng, *y.shape) if cotangent is None else cotangent
    return y, vjp(cotangent)

  y_ref, grads_ref = run(module())
  y, grads = run(cpu_lowering.layers(name)["conv"](5, (kernel, kernel), strides, padding))
  assert y.shape == y_ref.shape
  _close(y_ref, y)
  _close(grads_ref, grads)


@pytest.mark.parametrize("name", CPU_LOWERINGS)
@pytest.mark.parametrize("case", ["grouped", "dilated", "lhs_dilated", "bfloat16_1x1"])
def test_what_the_lowerings_do_not_cover_goes_to_lax_unchanged(name, case):
  """Grouped (ResNeXt) and dilated convolutions are lax's own: the same primitive with the
  same parameters in the jaxpr, no custom gradient or kernel call, bit-identical results.
  bf16 goes to the XLA "cpu" path (the kernels are float32), not to lax."""
  rng = np.random.default_rng(0)
  x, w = _rand(rng, 2, 8, 8, 8), _rand(rng, 3, 3, 2, 8)
  kwargs = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if case == "grouped":
    kwargs["feature_group_count"] = 4
  elif case == "dilated":
    w = _rand(rng, 3, 3, 8, 8)
    kwargs["rhs_dilation"] = (2, 2)
  elif case == "lhs_dilated":
    w = _rand(rng, 3, 3, 8, 8)
    kwargs["lhs_dilation"] = (2, 2)
  else:
    x, w = x.astype(jnp.bfloat16), _rand(rng, 1, 1, 8, 8).astype(jnp.bfloat16)
    kwargs["padding"] = ((0, 0), (0, 0))
  ours = cpu_conv.conv_general_dilated(name)
  jaxpr = str(jax.make_jaxpr(lambda x, w: ours(x, w, **kwargs))(x, w))
  if case == "bfloat16_1x1":
    assert "custom_vjp_call" in jaxpr and "ffi_call" not in jaxpr   # the "cpu" matmul path
    _close(jax.lax.conv_general_dilated(x, w, **kwargs).astype(jnp.float32),
           ours(x, w, **kwargs).astype(jnp.float32), rtol=1e-2)
    return
  reference = str(jax.make_jaxpr(lambda x, w: jax.lax.conv_general_dilated(x, w, **kwargs))(
      x, w))
  assert jaxpr == reference
  np.testing.assert_array_equal(jax.lax.conv_general_dilated(x, w, **kwargs),
                                ours(x, w, **kwargs))


def test_materialised_input_is_bit_identical():
  # dw reads x through a product with the identity (conv._materialised): x * 1 plus zeros.
  rng = np.random.default_rng(4)
  x = jnp.maximum(_rand(rng, 2, 5, 5, 16) * 1e3, 0) + _rand(rng, 2, 5, 5, 16) * 1e-30
  np.testing.assert_array_equal(jax.jit(cpu_conv._materialised)(x), x)


def test_cpu_lowerings_compile_convolutions_outside_ynnpack():
  options = cpu_lowering.compiler_options()
  assert options and "CONVOLUTION" not in options["xla_cpu_experimental_ynn_fusion_type"]
  assert lowering.choose("cpu").compiler_options == options
  x, w = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))  # big enough for YNNPACK
  f = lambda x, w: cpu_conv.cpu_conv(x, w, (1, 1), ((1, 1), (1, 1)))  # noqa: E731

  default = jax.jit(f).lower(x, w).compile().as_text()
  ours = lowering.choose("cpu").jit(f).lower(x, w).compile().as_text()
  assert _convolutions_in_ynn(default) == 1    # the premise: by default YNNPACK takes it
  assert _convolutions_in_ynn(ours) == 0 and "convolution(" in ours


def _convolutions_in_ynn(hlo: str) -> int:
  """How many YNNPACK fusions of a compiled module's text compute a convolution."""
  callees = re.findall(r"calls=%([\w.]+), .*__ynn_fusion", hlo)
  bodies = [re.search(rf"^%{re.escape(c)} \(.*?^}}", hlo, re.S | re.M).group(0)
            for c in callees]
  return sum("convolution(" in body for body in bodies)


def test_max_pool_gradient_picks_the_first_maximum_like_select_and_scatter():
  # Post-ReLU activations rounded to 1 decimal: many exact ties, inside windows and zeros.
  rng = np.random.default_rng(1)
  x = jnp.asarray(np.maximum(rng.standard_normal((2, 17, 16, 5)), 0).round(1), jnp.float32)
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  weights = jnp.arange(1.0, 6.0)

  def loss(x, pool):
    return jnp.sum(jnp.sin(pool(x, (3, 3), strides=(2, 2))) * weights)

  for name in CPU_LOWERINGS:
    pool = cpu_lowering.layers(name)["pool"]
    np.testing.assert_array_equal(nn.max_pool(x, (3, 3), strides=(2, 2)),
                                  pool(x, (3, 3), strides=(2, 2)))
    np.testing.assert_array_equal(jax.grad(loss)(x, nn.max_pool), jax.grad(loss)(x, pool))


def test_batch_norm_matches_flax_in_every_lowering():
  rng = np.random.default_rng(2)
  x = _rand(rng, 4, 5, 6, 7) * 3 + 1
  params = {"scale": _rand(rng, 7) + 2, "bias": _rand(rng, 7)}
  stats = {"mean": _rand(rng, 7), "var": jnp.abs(_rand(rng, 7)) + 1}
  weights = jnp.arange(7.0)

  def run(module):
    def loss(p, x):
      y, new = module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y) * weights), new
    (value, new), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    evaluated = module.clone(use_running_average=True).apply(
        {"params": params, "batch_stats": stats}, x)
    return value, new, grads, evaluated

  kwargs = dict(use_running_average=False, momentum=0.9, epsilon=1e-5)
  reference = run(nn.BatchNorm(**kwargs))
  _close(reference, run(BatchNorm(**kwargs)), rtol=1e-6)
  _close(reference, run(cpu_lowering.layers("cpu")["norm"](**kwargs)), rtol=1e-6)
  # "onednn" sums in another order (double accumulators), so it is not bit-compatible with
  # flax's float32 sums: measured here, flax's loss is 5.5e-7 (relative) off a float64
  # evaluation and onednn's 4.5e-7 off on the other side, 1.0e-6 apart. Its sums are
  # checked against float64 directly in tests/test_cpu_kernels.py.
  _close(reference, run(cpu_lowering.layers("onednn")["norm"](**kwargs)), rtol=2e-6)


def test_batch_norm_has_flax_variable_names():
  x = jnp.ones((2, 3, 3, 4))
  ours = BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
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
@pytest.mark.parametrize("model_name,size,train", [("resnet18", 64, True),
                                                   ("resnet50", 64, False),
                                                   ("resnet20", 32, True)])
@pytest.mark.parametrize("name", CPU_LOWERINGS)
def test_whole_train_step_gradients_match_the_default_layers(model_name, size, train, name):
  """Loss, every parameter gradient and the new BN statistics of one jitted training
  forward and backward: the path a train step takes, through every layer type.

  How close is "the same to float32 rounding" for a whole deep net? A tiny ResNet-50 batch
  (4 images of 64px: BN over 16 values per channel in stage 4) amplifies rounding a lot:
  measured, perturbing the input by 1e-6 moves the default path's logits by ~2e-4 and some
  gradients by percents. So the yardstick is the default path's own sensitivity: the CPU
  lowering may differ from it by no more than the default path differs from itself under an
  input perturbation of float32 rounding size (x10), or 1e-4. A wrong tap, phase or
  statistic is an O(1) error and fails either way."""
  rng = np.random.default_rng(3)
  x = _rand(rng, 4, size, size, 3)
  nudged = x * (1 + 2.0**-22 * _rand(rng, *x.shape))   # a few ulps per pixel
  labels = jnp.arange(4) % 10
  default = models.create(model_name, num_classes=10)
  variables = default.init(jax.random.PRNGKey(0), x[:1], train=False)

  def loss_and_grads(chosen, x):
    model = models.create(model_name, num_classes=10, **chosen.layers)

    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                train=train, mutable=["batch_stats"])
      onehot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), new
    # Compiled as the trainer compiles it, with the lowering's XLA options.
    return chosen.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  native = lowering.choose("native")
  reference = loss_and_grads(native, x)
  sensitivity = _max_rel_err(reference, loss_and_grads(native, nudged))
  error = _max_rel_err(reference, loss_and_grads(lowering.choose(name), x))
  assert error <= max(1e-4, 10 * sensitivity), (error, sensitivity)
