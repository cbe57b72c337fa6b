"""Every named depth has exactly the reference parameter count (no real init: eval_shape)."""

import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resnet_jax import models

# torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in m.parameters())
TORCHVISION_1000 = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
}
# timm's (torchvision has none of these).
TIMM_1000 = {"resnet200": 64_673_832, "seresnet50": 28_088_024, "seresnet18": 11_778_592,
             "resnet50d": 25_576_264}
# He et al. 2015, Table 6 (10 classes, option-A shortcuts): 0.27M .. 19.4M, printed rounded.
PAPER_CIFAR_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                 "resnet110": 1.7, "resnet1202": 19.4}
# Exact counts, pinned so a change of the architecture is noticed.
# Option B adds a 1x1 conv + BN where the width grows (16->32, 32->64): +2,752.
# WRN-28-10: Zagoruyko & Komodakis' 36.5M (their reference code's exact count).
CIFAR_EXACT_OTHER = {"resnet20_b": 272_474, "resnet56_b": 855_770, "resnet110_b": 1_730_714,
                     "wide_resnet28_10": 36_479_194}
CIFAR_EXACT = {"resnet8": 75_290, "resnet20": 269_722, "resnet32": 464_154,
               "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962,
               "resnet1202": 19_421_274}


def param_count(name, num_classes, size):
  model = models.create(name, num_classes=num_classes)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jnp.zeros((1, size, size, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name,expected", sorted({**TORCHVISION_1000, **TIMM_1000}.items()))
def test_imagenet_param_counts_equal_torchvision_and_timm(name, expected):
  assert param_count(name, 1000, 224) == expected


@pytest.mark.parametrize("depth", [18, 34, 50, 20, 56, 110])
def test_plain_twin_is_the_resnet_without_its_shortcuts(depth):
  """Same layers, same shapes; only the shortcut (projection) parameters are gone."""
  size = 64 if depth in (18, 34, 50) else 16
  def shapes(name):
    model = models.create(name, num_classes=10)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    return {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(v["params"])[0]}
  res, plain = shapes(f"resnet{depth}"), shapes(f"plain{depth}")
  assert not any("shortcut" in k for k in plain)
  assert plain == {k: v for k, v in res.items() if "shortcut" not in k}
  if depth in (20, 56, 110):   # option-A shortcuts have no parameters at all
    assert plain == res


@pytest.mark.parametrize("depth", ["20", "20_b", "18", "50"])
def test_plain_and_residual_forward_differ_only_by_the_shortcut(depth):
  """The residual net with every shortcut's output replaced by zeros computes exactly the
  plain net (same variables, train and eval mode): nothing but the shortcut differs. And the
  shortcut matters: without the replacement the outputs differ."""
  from resnet_jax.models.blocks import Shortcut
  size = 16 if depth.startswith("20") else 64
  x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
  res = models.create(f"resnet{depth}", 10)
  plain = models.create(f"plain{depth.split('_')[0]}", 10, **(
      {"shortcut": "none"} if depth.endswith("_b") else {}))
  variables = res.init(jax.random.PRNGKey(0), x)

  def no_shortcut(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Shortcut) and context.method_name == "__call__":
      return jnp.zeros_like(out)
    return out

  def run(model, train):
    out, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
    # (a projection shortcut's own BN statistics exist in the residual net only)
    return out, {k: v for k, v in traverse_util.flatten_dict(updates).items()
                 if "shortcut" not in k}

  for train in (False, True):
    with nn.intercept_methods(no_shortcut):
      cut, cut_stats = run(res, train)
    out, stats = run(plain, train)
    np.testing.assert_array_equal(cut, out)
    assert cut_stats.keys() == stats.keys()
    for key in stats:
      np.testing.assert_array_equal(cut_stats[key], stats[key])
    assert not np.allclose(run(res, train)[0], cut)


RECORDED = json.load(open(os.path.join(os.path.dirname(__file__), "data",
                                       "model_variables.json")))


def _variable_listing(name):
  """As tests/data/model_variables.json was recorded: 'path [shape] dtype', sorted."""
  cifar = models.MODEL_SPECS[name]["stem"] == "cifar"
  size, classes = (32, 10) if cifar else (64, 1000)
  model = models.create(name, num_classes=classes)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  flat = traverse_util.flatten_dict(variables)
  return sorted(f"{'/'.join(k)} {list(v.shape)} {v.dtype}" for k, v in flat.items())


@pytest.mark.parametrize("name", sorted(RECORDED["sha256"]))
def test_every_model_keeps_the_variables_it_had_when_they_were_recorded(name):
  """Parameter names and shapes are the checkpoint and weight-file format: every model of
  the registry as recorded in tests/data/model_variables.json (before the models/
  refactor) still has exactly those variables. Change that file only on purpose, with a
  converter for the old names."""
  assert name in models.MODEL_SPECS, f"{name} was removed from the registry"
  lines = _variable_listing(name)
  if name in RECORDED["listings"]:        # readable differences for one model per flavour
    assert lines == RECORDED["listings"][name]
  assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == RECORDED["sha256"][name]


@pytest.mark.parametrize("name", ["resnet20", "resnet18_v2"])
def test_frozen_stages_keep_their_batch_norm_in_inference_mode(name):
  """frozen_stages' BatchNorm uses and keeps its running statistics in training mode (for
  fine-tuning with frozen layers); the other parts still learn theirs."""
  size = 16 if name == "resnet20" else 64
  x = jax.random.normal(jax.random.PRNGKey(1), (4, size, size, 3)) * 2 + 1
  frozen = ("stem", "stage1") + (("final",) if name.endswith("_v2") else ())
  model = models.create(name, num_classes=10, frozen_stages=frozen)
  variables = model.init(jax.random.PRNGKey(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = traverse_util.flatten_dict(variables["batch_stats"])
  after = traverse_util.flatten_dict(updates["batch_stats"])
  for key, value in after.items():
    part = key[0].split("_")[0]
    part = "final" if key[0] == "final_bn" else part
    assert np.array_equal(value, before[key]) == (part in frozen), key
  # A frozen part computes what inference mode computes.
  feats = model.apply(variables, x, train=True, return_features=True, mutable=["batch_stats"])[0]
  eval_feats = model.apply(variables, x, train=False, return_features=True)
  np.testing.assert_allclose(feats["stage1"], eval_feats["stage1"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(feats["stage2"], eval_feats["stage2"])
  with pytest.raises(ValueError, match="unknown part 'stage9'"):
    models.create(name, num_classes=10, frozen_stages=("stage9",)).init(
        jax.random.PRNGKey(0), x)


def test_list_models_is_in_natural_order():
  names = models.list_models()
  assert names.index("resnet8") < names.index("resnet20") < names.index("resnet110")
  assert {"plain18", "plain34", "plain20", "plain56", "resnet200", "wide_resnet50_2",
          "resnext50_32x4d"} <= set(names)


@pytest.mark.parametrize("name,expected", sorted(CIFAR_EXACT.items()))
def test_cifar_param_counts(name, expected):
  count = param_count(name, 10, 32)
  assert count == expected
  if name in PAPER_CIFAR_M:
    # The paper prints two significant digits.
    assert round(count / 1e6, 2 if count < 1e6 else 1) == PAPER_CIFAR_M[name]


def test_every_registered_name_builds_and_runs_forward():
  for name in models.list_models():
    if name.endswith("1202"):
      continue   # same code as resnet110/plain110, 11x deeper: too slow to trace here
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


def test_features_for_backbone_use():
  model = models.create("resnet50", num_classes=1000)
  feats = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, return_features=True)[0],
      jnp.zeros((2, 224, 224, 3)))
  assert {k: v.shape for k, v in feats.items()} == {
      "stem": (2, 112, 112, 64), "stage1": (2, 56, 56, 256), "stage2": (2, 28, 28, 512),
      "stage3": (2, 14, 14, 1024), "stage4": (2, 7, 7, 2048), "pre_logits": (2, 2048),
      "logits": (2, 1000)}


def test_num_classes_zero_is_a_headless_backbone_and_heads_can_be_replaced():
  x = jnp.ones((1, 32, 32, 3))
  backbone = models.create("resnet18", num_classes=0)
  variables = backbone.init(jax.random.PRNGKey(0), x)
  assert "head" not in variables["params"]
  assert backbone.apply(variables, x).shape == (1, 512)
  # A new head: the same variables plus a fresh Dense for 7 classes.
  model = models.create("resnet18", num_classes=7)
  fresh = model.init(jax.random.PRNGKey(1), x)
  params = dict(variables["params"], head=fresh["params"]["head"])
  out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
  assert out.shape == (1, 7)


def test_stochastic_depth_is_random_in_training_and_off_in_eval():
  model = models.create("resnet20", num_classes=10, drop_path_rate=0.5)
  base = models.create("resnet20", num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  run = lambda m, seed: m.apply(variables, x, train=True, mutable=["batch_stats"],  # noqa
                                rngs={"dropout": jax.random.PRNGKey(seed)})[0]
  assert not np.allclose(run(model, 1), run(model, 2))
  np.testing.assert_allclose(model.apply(variables, x), base.apply(variables, x), rtol=1e-6)
  np.testing.assert_allclose(run(models.create("resnet20", 10, drop_path_rate=0.0), 1),
                             run(base, 2), rtol=1e-6)


@pytest.mark.parametrize("name,expected", sorted(CIFAR_EXACT_OTHER.items()))
def test_cifar_option_b_and_wide_resnet_param_counts(name, expected):
  assert param_count(name, 10, 32) == expected


def _param_shapes(name, size=64, num_classes=10):
  model = models.create(name, num_classes=num_classes)
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  return {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(v["params"])[0]}


def test_v1_is_v15_plus_conv_biases_with_the_stride_moved_to_the_1x1():
  v15, v1 = _param_shapes("resnet50"), _param_shapes("resnet50_v1")
  assert {k: v for k, v in v1.items() if not k.endswith("['bias']") or "bn" in k
          or "head" in k} == v15
  conv_biases = [k for k in v1 if "conv" in k and k.endswith("['bias']")]
  assert len(conv_biases) == 53          # every conv of ResNet-50 (Keras' use_bias=True)
  x = jnp.zeros((1, 64, 64, 3))
  inner = {}
  for name in ("resnet50", "resnet50_v1"):
    model = models.create(name, num_classes=10)
    _, state = model.init_with_output(jax.random.PRNGKey(0), x,
                                      capture_intermediates=True)
    conv1 = state["intermediates"]["stage2_block1"]["conv1"]["__call__"][0]
    inner[name] = conv1.shape[1]
  assert inner == {"resnet50": 16, "resnet50_v1": 8}   # 64/4 in, halved by the 1x1 in v1


def test_resnet_d_has_a_deep_stem_and_average_pool_shortcuts():
  shapes = _param_shapes("resnet50d")
  assert shapes["['stem_conv1']['kernel']"] == (3, 3, 3, 32)
  assert shapes["['stem_conv3']['kernel']"] == (3, 3, 32, 64)
  # stride-1 1x1 projections: the 2x2 average pool before them does the downsampling.
  assert shapes["['stage2_block1']['shortcut']['conv']['kernel']"] == (1, 1, 256, 512)


def test_average_pool_shortcut_matches_torch_ceil_mode_on_odd_sizes():
  """AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): the last row/column of an
  odd-sized map is averaged over the pixels that exist."""
  from resnet_jax.models.blocks import _avg_pool_ceil
  x = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
  out = np.asarray(_avg_pool_ceil(jnp.asarray(x), 2))
  expected = np.zeros((2, 3, 3, 3), np.float32)
  for i in range(3):
    for j in range(3):
      expected[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_v2_is_pre_activation_with_keras_strides_at_the_end_of_stages():
  model = models.create("resnet50_v2", num_classes=1000)
  feats = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, return_features=True)[0],
      jnp.zeros((1, 224, 224, 3)))
  assert {k: v.shape[1:] for k, v in feats.items() if k.startswith("stage")} == {
      "stage1": (28, 28, 256), "stage2": (14, 14, 512), "stage3": (7, 7, 1024),
      "stage4": (7, 7, 2048)}
  shapes = _param_shapes("resnet50_v2")
  assert "['stem_bn']['scale']" not in shapes and "['final_bn']['scale']" in shapes
  assert "['stage1_block3']['shortcut']['conv']['kernel']" not in shapes   # subsampled


def test_zero_init_makes_every_residual_block_the_identity_at_init():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  from resnet_jax.models.blocks import BasicBlock, PreActBasicBlock
  for block in (BasicBlock, PreActBasicBlock):   # v1: last BN scale = 0; v2: last conv = 0
    model = models.create("resnet20", num_classes=10, zero_init_last_bn=True, block=block)
    feats = model.apply(model.init(jax.random.PRNGKey(1), x), x, return_features=True)
    # Stage 1 keeps the width: each of its blocks passes its input through unchanged.
    assert feats["stage1"].shape == feats["stem"].shape
    np.testing.assert_allclose(feats["stage1"], feats["stem"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats["stage2"], 0)


def test_macs_from_xla_and_counted_match_the_published_figures():
  from resnet_jax.models import flops
  resnet50 = models.create("resnet50", num_classes=1000)
  # torchvision publishes 4.09 GFLOPS (multiply-adds, padding positions included).
  assert abs(flops.analytic_macs(resnet50, 224) / 1e9 - 4.089) < 0.005
  # XLA does not count multiply-adds with zero padding: a little less.
  assert 3.9 < flops.xla_macs(resnet50, 224) / 1e9 < 4.1
  assert abs(flops.analytic_macs(models.create("resnet18", 1000), 224) / 1e9 - 1.814) < 0.005


def test_models_command_prints_params_macs_and_reference():
  import subprocess
  import sys
  from conftest import REPO
  out = subprocess.run([sys.executable, "-m", "resnet_jax.models", "resnet20", "--markdown"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "| resnet20 | 32x32 | 269,722 | 0.04 | 0.04 | He et al. 2015" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "resnet_jax.models", "resnet51"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "unknown model 'resnet51'" in bad.stderr
