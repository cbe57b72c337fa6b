"""resnet_jax/cpu_speed/kernels: the oneDNN convolutions, BatchNorm sums and max pooling
called through XLA's FFI.

What the models see of them (same numbers as the default layers, whole train steps) is in
tests/test_cpu_speed.py; here: that the sources build into a library exporting every FFI
target, the sums against float64, batch-sharded calls on 8 devices, the build cache, and
the fallback and the error where they cannot build.
"""

import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import lowering, models
from resnet_jax.cpu_speed import kernels as cpu_kernels
from resnet_jax.cpu_speed import lowering as cpu_lowering
from resnet_jax.cpu_speed.kernels import library

from conftest import REPO, cli_env

x86_64_linux = sys.platform == "linux" and platform.machine() == "x86_64"


BUILD = textwrap.dedent("""
    import ctypes, json
    from resnet_jax.cpu_speed.kernels import library
    path = library.build()
    lib = ctypes.CDLL(str(path))
    print(json.dumps({"path": str(path),
                      "missing": [s for s in library.TARGETS.values() if not hasattr(lib, s)]}))
""")


def test_the_sources_build_into_a_library_with_every_ffi_target(tmp_path):
  """From the sources, into an empty cache: every handler the FFI table names is exported
  (a renamed or dropped handler fails here, not at a user's first step). Not a skip on
  x86-64 Linux: CI is such a machine, and losing the kernels would silently cost ~1.5x."""
  if not x86_64_linux:
    pytest.skip("oneDNN's wheels are x86-64 Linux only")
  proc = subprocess.run([sys.executable, "-c", BUILD], cwd=REPO, capture_output=True,
                        text=True, timeout=600,
                        env=cli_env(1, RESNET_JAX_KERNEL_CACHE=str(tmp_path)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  built = json.loads(proc.stdout.strip().splitlines()[-1])
  assert built["path"].startswith(str(tmp_path)) and built["missing"] == [], built


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason=f"{cpu_kernels.unavailable_reason()}")


def _rand(rng, shape, loc=0.0, scale=1.0):
  return (rng.standard_normal(shape) * scale + loc).astype(np.float32)


# Odd channel counts, row counts that are no multiple of the kernels' 64-row blocks, a
# single value, a wide 2048-channel map, and an offset mean (where float sums lose digits).
# Channels: the kernels take 64 at a time, then 16, then one by one (83 = all three).
SHAPES = [((3, 5, 7, 13), 0.0), ((2, 33, 33, 64), 0.0), ((1, 1, 1, 1), 0.0),
          ((4, 3, 3, 2048), 0.0), ((16, 16, 16, 16), 100.0), ((2, 9, 7, 83), 1.0)]


@needs_kernels
@pytest.mark.parametrize("shape,loc", SHAPES)
def test_channel_sums_match_float64(shape, loc):
  rng = np.random.default_rng(0)
  x = _rand(rng, shape, loc)
  s, q = jax.jit(cpu_kernels.channel_sums)(x)
  x64 = x.astype(np.float64).reshape(-1, shape[-1])
  _assert_sums(s, x64)
  _assert_sums(q, x64 ** 2)


def _assert_sums(actual, terms):
  """`actual` is the column sums of `terms` [rows, C] to float32 rounding: float partials
  over 64-row blocks folded in double err by a few ulps of the sum of magnitudes."""
  bound = 1e-6 * np.abs(terms).sum(0)
  error = np.abs(np.asarray(actual, np.float64) - terms.sum(0))
  assert (error <= bound).all(), float((error / bound).max())


@needs_kernels
@pytest.mark.parametrize("shape,loc", SHAPES)
def test_centred_sums_match_float64(shape, loc):
  rng = np.random.default_rng(1)
  x, dy = _rand(rng, shape, loc), _rand(rng, shape)
  mean = x.reshape(-1, shape[-1]).mean(0).astype(np.float32)
  s, c = jax.jit(cpu_kernels.centred_sums)(dy, x, mean)
  dy64, x64 = (a.astype(np.float64).reshape(-1, shape[-1]) for a in (dy, x))
  _assert_sums(s, dy64)
  _assert_sums(c, dy64 * (x64 - mean.astype(np.float64)))


@needs_kernels
def test_a_train_step_computes_no_unused_input_gradient():
  """The stem's dx (the image's gradient) is dead code: XLA drops the FFI call, so a
  step has one data-gradient convolution fewer than it has convolutions."""
  model = models.create("resnet8", num_classes=10, **cpu_lowering.layers("onednn"))
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                            x, train=True, mutable=["batch_stats"])
    return jnp.sum(logits)

  hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
  count = lambda target: hlo.count(f'custom_call_target="{target}"')  # noqa: E731
  convs = count("resnet_jax_conv_forward")
  assert convs == sum(1 for k in jax.tree.leaves(variables["params"]) if k.ndim == 4) > 0
  assert count("resnet_jax_conv_backward_weights") == convs
  assert count("resnet_jax_conv_backward_data") == convs - 1


SHARDED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from resnet_jax.cpu_speed import kernels as cpu_kernels
    from resnet_jax.cpu_speed.conv import conv_general_dilated

    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 9, 9, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 6, 5)), jnp.float32)

    def f(x, w, impl):
      conv = conv_general_dilated(impl) if impl == "onednn" else jax.lax.conv_general_dilated
      def loss(x, w):
        y = conv(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y)), y
      grads, y = jax.grad(loss, (0, 1), has_aux=True)(x, w)
      s, q = cpu_kernels.channel_sums(y) if impl == "onednn" else (
          jnp.sum(y, (0, 1, 2)), jnp.sum(y * y, (0, 1, 2)))
      return grads, (y, s, q)

    step = jax.jit(lambda x, w: f(x, w, "onednn"))
    xs = jax.device_put(x, batch)
    grads, (y, s, q) = step(xs, w)
    (gx_ref, gw_ref), (y_ref, s_ref, q_ref) = jax.jit(lambda x, w: f(x, w, "native"))(x, w)
    err = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    hlo = step.lower(xs, w).compile().as_text()
    print(json.dumps(dict(
        errors=[err(a, b) for a, b in [(y, y_ref), (s, s_ref), (q, q_ref),
                                       (grads[0], gx_ref), (grads[1], gw_ref)]],
        y_sharding=str(y.sharding.spec), gx_sharding=str(grads[0].sharding.spec),
        devices=len(y.sharding.device_set),
        all_gathers=hlo.count(" all-gather("), all_reduces=hlo.count(" all-reduce("),
        local_forward="f32[2,5,5,5]{3,2,1,0} custom-call(" in hlo)))
""")


@needs_kernels
def test_batch_sharded_calls_on_8_devices_match_one_device():
  """The kernels' custom partitioning: each device convolves its 2 of 16 images (the FFI
  call's output is the local f32[2,5,5,5]), nothing is gathered, and the batch sums (dw,
  BN sums) are all-reduced: the same numbers as the native path on one device."""
  proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, env=cli_env(8),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert max(r["errors"]) < 2e-5, r
  assert r["devices"] == 8 and "data" in r["y_sharding"] and "data" in r["gx_sharding"], r
  assert r["local_forward"] and r["all_gathers"] == 0, r
  assert r["all_reduces"] >= 1, r   # dw and the two BN sums (XLA may combine them)


@needs_kernels
def test_the_build_is_cached_and_keyed_by_what_it_depends_on(monkeypatch):
  path = library.build()
  assert path.is_file() and library.build() == path          # second call: the cache
  cxx, onednn = library._compiler(), library._onednn_root()
  key = library._build_key(cxx, onednn)
  assert path.name == f"resnet_jax_cpu_kernels-{key}.so"
  # Another CPU (a cache shared over NFS): -march=native code must not be reused there.
  monkeypatch.setattr(library, "_cpu_flags", lambda: "flags : sse2")
  assert library._build_key(cxx, onednn) != key


UNAVAILABLE = textwrap.dedent("""
    from resnet_jax import lowering
    auto = lowering.choose("auto")
    print("auto ->", auto.name)
    print("note:", auto.note)
    try:
      lowering.choose("onednn")
    except Exception as e:
      print("onednn ->", type(e).__name__, e)
""")


def test_without_a_compiler_auto_falls_back_to_xla_and_onednn_says_why(tmp_path):
  env = cli_env(1, CXX=str(tmp_path / "no-such-g++"), RESNET_JAX_KERNEL_CACHE=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", UNAVAILABLE], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "auto -> cpu"
  assert "no C++ compiler found (looked for" in lines[1] and "no-such-g++" in lines[1]
  assert "slower XLA-only 'cpu' lowering" in lines[1]
  assert lines[2].startswith("onednn -> LoweringUnavailable lowering 'onednn': no C++ ")


@pytest.mark.parametrize("command", [
    ["-m", "resnet_jax.benchmark", "--model", "resnet8", "--image-size", "8",
     "--batch-per-device", "2", "--devices", "1", "--lowering", "onednn"],
    ["-m", "resnet_jax", "--config=configs/digits_resnet20.py", "--workdir={workdir}",
     "--config.lowering=onednn"]])
def test_asking_for_onednn_where_it_cannot_build_is_a_one_line_error(tmp_path, command):
  workdir = tmp_path / "run"
  env = cli_env(1, CXX=str(tmp_path / "no-such-g++"), RESNET_JAX_KERNEL_CACHE=str(tmp_path))
  proc = subprocess.run([sys.executable, *(a.format(workdir=workdir) for a in command)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "lowering 'onednn': no C++ compiler found" in lines[0], lines
  assert not (workdir / "config.json").exists()   # the trainer wrote nothing


@needs_kernels
def test_max_pool_matches_select_and_scatter_on_nans_infinities_and_shared_winners():
  """Edge cases of the kernel's first-maximum rule against XLA's native max pool: -inf
  everywhere (the first tap wins), one value that wins four overlapping 3x3/2 windows (its
  gradient is their sum), and a NaN: y is NaN as natively, and the NaN window's gradient is
  dropped, as the XLA "cpu" lowering does (select-and-scatter hands it to some other tap).
  The kernel works on 16 channels at a time and channel by channel on the rest, so the edge
  cases sit in channels 0-2 (a vector) and 16-18 (the tail), around channels of values
  drawn from four levels, where most windows hold ties."""
  edge = np.zeros((2, 5, 5, 3), np.float32)
  edge[0, 2, 2, 0] = 5.0                 # centre of the 5x5: in all four windows
  edge[0, 0, 0, 1] = np.nan
  edge[1, :, :, 2] = -np.inf
  edge[1, 1, 3, 1] = 2.0
  ties = np.random.default_rng(0).integers(-2, 2, (2, 5, 5, 13)).astype(np.float32)
  x = np.concatenate([edge, ties, edge], axis=-1)        # 19 channels
  dy = np.arange(1, 2 * 2 * 2 * 19 + 1, dtype=np.float32).reshape(2, 2, 2, 19)

  def run(name):
    pool = lowering.choose(name).layers.get("pool", models.DEFAULT_LAYERS["pool"])
    y, vjp = jax.vjp(lambda x: pool(x, (3, 3), strides=(2, 2)), jnp.asarray(x))
    return np.asarray(y), np.asarray(vjp(jnp.asarray(dy))[0])

  (y, dx), (y_ref, dx_ref), (_, dx_cpu) = run("onednn"), run("native"), run("cpu")
  np.testing.assert_array_equal(y, y_ref)          # NaN where the native y is NaN, too
  np.testing.assert_array_equal(dx, dx_cpu)
  for c in (0, 16):                                # the vector path and the tail
    assert np.isnan(y[0, 0, 0, c + 1]) and dx[0, 2, 2, c] == dy[0, :, :, c].sum()
  # Natively, each NaN window's gradient lands on one tap inside it; nothing else differs.
  where = np.argwhere(dx_ref != dx)
  assert sorted(w[3] for w in where) == [1, 17], where
  for w in where:
    assert w[0] == 0 and max(w[1:3]) < 3, where
    assert dx_ref[tuple(w)] - dx[tuple(w)] == dy[0, 0, 0, w[3]]


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 6, 8, 19), (3, 9, 9, 64)])
def test_max_pool_on_random_maps_matches_xla(shape):
  """Random maps whose last row and column no 3x3/2 window reaches (6x8) and a stem-like
  width of 64: the kernel's y is XLA's, its gradient the "cpu" lowering's, and the pixels
  no window reads get exactly zero."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape).astype(np.float32))
  y_shape = (shape[0], (shape[1] - 3) // 2 + 1, (shape[2] - 3) // 2 + 1, shape[3])
  dy = jnp.asarray(np.random.default_rng(2).normal(size=y_shape).astype(np.float32))

  def run(name):
    pool = lowering.choose(name).layers.get("pool", models.DEFAULT_LAYERS["pool"])
    y, vjp = jax.vjp(lambda x: pool(x, (3, 3), strides=(2, 2)), x)
    return np.asarray(y), np.asarray(vjp(dy)[0])

  (y, dx), (y_ref, _), (_, dx_cpu) = run("onednn"), run("native"), run("cpu")
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_cpu, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(dx == 0, dx_cpu == 0)
  if shape[1] == 6:
    assert not dx[:, 5].any() and not dx[:, :, 7].any()


WEIGHT_GRADIENTS = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from resnet_jax.cpu_speed import kernels
    for c, f in ((16, 32), (32, 16)):
      x, w = jnp.ones((2, 6, 6, c)), jnp.ones((1, 1, c, f))
      jax.grad(lambda w: kernels.conv2d(x, w, (1, 1), ((0, 0), (0, 0))).sum())(w)
""")


@needs_kernels
def test_a_widening_1x1_weight_gradient_runs_on_onednns_gemm():
  """The kernel's one implementation choice (onednn_conv.cc, GemmWeightGradient): a stride-1
  1x1 convolution that widens the channels gets its weight gradient from oneDNN's GEMM, a
  narrowing one from the default direct kernel, as oneDNN's own log of executed primitives
  shows."""
  out = subprocess.run([sys.executable, "-c", WEIGHT_GRADIENTS], capture_output=True,
                       text=True, env=cli_env(ONEDNN_VERBOSE="1"), cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr
  lines = [line for line in out.stdout.splitlines()
           if ",exec," in line and "convolution" in line and "backward_weights" in line]
  assert len(lines) == 2, out.stdout
  widening, narrowing = lines
  assert "gemm" in widening and "ic16oc32" in widening, widening
  assert "gemm" not in narrowing and "ic32oc16" in narrowing, narrowing
