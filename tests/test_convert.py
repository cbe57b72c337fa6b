"""Weight conversion: exact round trips, torchvision's key set, one-line errors, the CLI.

No downloads and no torch needed (the .pth cases skip without torch); parity of the forward
pass against real torchvision / timm models is tests/test_torchvision_parity.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import convert
from resnet_jax.convert import __main__ as cli
from resnet_jax.convert import torch_layout, weights_file

from conftest import REPO, cli_env


def random_variables(name, num_classes, seed=0):
  """Random (non-default) params and batch_stats of `name`; variances positive."""
  rng = np.random.default_rng(seed)
  template = weights_file.abstract_variables(name, num_classes)
  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.standard_normal(leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, template)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y)


def torchvision_keys(stage_sizes, bottleneck, num_classes=1000):
  """torchvision.models.ResNet(...).state_dict().keys(), written out from its definition."""
  def bn(prefix):
    return [f"{prefix}.{leaf}" for leaf in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
  keys = ["conv1.weight", *bn("bn1")]
  for s, blocks in enumerate(stage_sizes, 1):
    for b in range(blocks):
      prefix = f"layer{s}.{b}"
      for k in range(1, 4 if bottleneck else 3):
        keys += [f"{prefix}.conv{k}.weight", *bn(f"{prefix}.bn{k}")]
      if b == 0 and (s > 1 or bottleneck):   # the width or the stride changes
        keys += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
  if num_classes:
    keys += ["fc.weight", "fc.bias"]
  return keys


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "seresnet18", "resnext50_32x4d"])
def test_round_trip_through_a_torchvision_file_is_exact(name, tmp_path):
  variables = random_variables(name, 10)
  path = str(tmp_path / "tv.safetensors")
  weights_file.write_safetensors(path, convert.torch_state_dict(variables, name), {})
  back = convert.variables_from_state_dict(convert.read_state_dict(path), name)
  assert_trees_equal(variables, back)


@pytest.mark.parametrize("name,stages,bottleneck,total,nbt", [
    # Counts measured on torchvision 0.28's resnet.py (experiments/torchvision_parity_local.py).
    ("resnet18", (2, 2, 2, 2), False, 122, 20),
    ("resnet50", (3, 4, 6, 3), True, 320, 53),
])
def test_exported_keys_are_torchvisions(name, stages, bottleneck, total, nbt):
  state = convert.torch_state_dict(random_variables(name, 1000), name)
  expected = torchvision_keys(stages, bottleneck)
  assert len(expected) == total
  assert sum(k.endswith("num_batches_tracked") for k in expected) == nbt
  assert set(state) == set(expected)
  # Layouts: OIHW convs, (out, in) fc, int64 zero counters for strict load_state_dict.
  shapes = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 512 * (4 if bottleneck else 1)),
            "fc.bias": (1000,), "layer2.0.downsample.0.weight":
            (512, 256, 1, 1) if bottleneck else (128, 64, 1, 1)}
  for key, shape in shapes.items():
    assert state[key].shape == shape, key
  assert state["bn1.num_batches_tracked"].dtype == np.int64
  assert state["bn1.num_batches_tracked"] == 0


def test_deep_stem_avg_down_and_se_use_timm_names():
  # timm 1.0's resnet50d / seresnet50 state dicts: 332 (55 BN) and 384 (53 BN) keys.
  d = convert.torch_state_dict(random_variables("resnet50d", 1000), "resnet50d")
  assert len(d) == 332 and sum(k.endswith("num_batches_tracked") for k in d) == 55
  stem = {k.rsplit(".", 1)[0] for k in d if k.startswith(("conv1", "bn1"))}
  assert stem == {"conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1"}
  assert d["conv1.0.weight"].shape == (32, 3, 3, 3)
  # avg_down: Sequential(pool, conv, bn) -- the pool takes index 0, even where it is Identity.
  assert d["layer1.0.downsample.1.weight"].shape == (256, 64, 1, 1)
  assert "layer1.0.downsample.2.running_var" in d
  assert not any(".downsample.0." in k for k in d)
  se = convert.torch_state_dict(random_variables("seresnet50", 1000), "seresnet50")
  assert len(se) == 384
  assert se["layer1.0.se.fc1.weight"].shape == (16, 256, 1, 1)
  assert se["layer1.0.se.fc2.bias"].shape == (256,)


def test_every_torch_layout_model_maps_every_leaf():
  """The mapping comes from tree paths: each registered torch-layout model converts."""
  for name in ("resnet34", "resnet20", "resnet20_b", "plain18", "plain50", "resnet8",
               "wide_resnet50_2", "resnet18d"):
    assert convert.layout_of(name) == "torch"
    template = weights_file.abstract_variables(name, 3)
    state = torch_layout.to_torch(jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                               template),
                                  avg_down=name.endswith("d"))
    n_leaves = len(jax.tree.leaves(template))
    n_bn = len(jax.tree.leaves(template["batch_stats"])) // 2
    assert len(state) == n_leaves + n_bn, name
  assert [convert.layout_of(n) for n in ("resnet50_v1", "resnet50_v2", "wide_resnet16_8")] == \
      ["keras", "keras", "none"]


def test_our_file_keeps_weights_and_metadata(tmp_path):
  variables = random_variables("resnet18", 7)
  path = str(tmp_path / "ours.safetensors")
  prep = weights_file.PREPROCESSING["torchvision"]
  weights_file.save(path, variables, "resnet18", prep, "torchvision:resnet18 test")
  back, info = weights_file.load(path)
  assert_trees_equal(variables, back)
  assert info == {"model": "resnet18", "num_classes": 7, "preprocessing": prep,
                  "source": "torchvision:resnet18 test"}
  assert prep["mean"] == [123.675, 116.28, 103.53] and prep["std"] == [58.395, 57.12, 57.375]
  assert prep["crop_pct"] == 0.875 and prep["interpolation"] == "bilinear"
  assert weights_file.preprocessing_for("timm", "resnet50d")["interpolation"] == "bicubic"
  header = weights_file.read_header(path)
  assert header["format"] == "resnet_jax" and header["num_classes"] == "7"
  assert set(header) == {"format", "model", "num_classes", "preprocessing", "source"}


def test_class_names_and_greyscale_models_in_the_file(tmp_path):
  """Optional class_names in the header (one per class; absent: info has none); a model
  whose stem takes 1-channel images (a run on digits) with 1-value mean/std."""
  path = str(tmp_path / "named.safetensors")
  names = ["cat", "dog", "tench, Tinca tinca"]
  variables = random_variables("resnet18", 3)
  prep = weights_file.PREPROCESSING["torchvision"]
  weights_file.save(path, variables, "resnet18", prep, "test", class_names=names)
  assert weights_file.read_info(path)["class_names"] == names
  assert weights_file.load(path)[1]["class_names"] == names
  with pytest.raises(ValueError) as e:
    weights_file.save(path, variables, "resnet18", prep, "test", class_names=["a", "b"])
  _one_line_error(e, "class_names must be 3 strings")
  # The names travel into the torchvision-layout export's metadata too.
  exported = str(tmp_path / "tv.safetensors")
  convert.export_file(path, exported)
  assert json.loads(weights_file.read_header(exported)["class_names"]) == names

  grey = jax.tree.map(lambda x: np.ones(x.shape, np.float32),
                      weights_file.abstract_variables("resnet8", 10, channels=1))
  assert weights_file.channels_of(grey) == 1 and weights_file.channels_of(variables) == 3
  grey_prep = dict(image_size=8, crop_pct=1.0, interpolation="bilinear", channel_order="RGB",
                   mean=[78.0], std=[96.0])
  grey_path = str(tmp_path / "grey.safetensors")
  weights_file.save(grey_path, grey, "resnet8", grey_prep, "test")
  back, info = weights_file.load(grey_path)
  assert_trees_equal(grey, back)
  assert info["preprocessing"] == grey_prep and "class_names" not in info
  with pytest.raises(ValueError) as e:     # 3 values for a 1-channel stem
    weights_file.save(grey_path, grey, "resnet8", prep, "test")
  _one_line_error(e, "preprocessing mean needs 1 value(s)")
  with pytest.raises(ValueError) as e:
    weights_file.save(grey_path, grey, "resnet8", dict(grey_prep, resize="stretch"), "test")
  _one_line_error(e, "resize='stretch'")


def test_keras_preprocessing_metadata_survives(tmp_path):
  from resnet_jax.convert import keras_layout
  v1, v2 = keras_layout.PREPROCESSING["resnet50_v1"], keras_layout.PREPROCESSING["resnet50_v2"]
  assert v1["channel_order"] == "BGR" and v1["mean"] == [103.939, 116.779, 123.68]
  assert v2["mean"] == [127.5] * 3 and v2["std"] == [127.5] * 3
  path = str(tmp_path / "v1.safetensors")
  weights_file.save(path, random_variables("resnet50_v1", 4), "resnet50_v1", v1, "keras:x")
  assert weights_file.load(path)[1]["preprocessing"] == v1


def test_exporting_a_keras_layout_model_is_refused(tmp_path, capsys):
  path = str(tmp_path / "v2.safetensors")
  weights_file.save(path, random_variables("resnet50_v2", 4), "resnet50_v2",
                    weights_file.PREPROCESSING["timm"], "test")
  assert cli.main(["export", path, str(tmp_path / "tv.safetensors")]) == 2
  assert "resnet50_v2 has no torchvision/timm counterpart" in capsys.readouterr().err
  assert cli.main(["export", "--model", "resnet50", path, str(tmp_path / "x.safetensors")]) == 2
  assert "holds resnet50_v2, not resnet50" in capsys.readouterr().err


def test_headless_import_and_inferred_num_classes():
  state = convert.torch_state_dict(random_variables("resnet18", 5), "resnet18")
  assert convert.variables_from_state_dict(state, "resnet18")["params"]["head"]["kernel"].shape \
      == (512, 5)
  backbone = convert.variables_from_state_dict(state, "resnet18", num_classes=0)
  assert "head" not in backbone["params"]


# ------------------------------------------------------------------------------- bad input

def _one_line_error(excinfo, *needles):
  message = str(excinfo.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, (needle, message)


def test_missing_unexpected_and_misshapen_keys_are_named():
  state = convert.torch_state_dict(random_variables("resnet18", 10), "resnet18")
  bad = dict(state)
  del bad["layer1.0.conv1.weight"]
  with pytest.raises(ValueError) as e:
    convert.variables_from_state_dict(bad, "resnet18")
  _one_line_error(e, "missing", "layer1.0.conv1.weight", "(64, 64, 3, 3)")

  bad = dict(state, **{"layer9.conv.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError) as e:
    convert.variables_from_state_dict(bad, "resnet18")
  _one_line_error(e, "unexpected", "layer9.conv.weight")

  bad = dict(state, **{"layer2.0.conv2.weight": np.zeros((128, 128, 1, 1), np.float32)})
  with pytest.raises(ValueError) as e:
    convert.variables_from_state_dict(bad, "resnet18")
  _one_line_error(e, "layer2.0.conv2.weight", "(128, 128, 1, 1)", "(128, 128, 3, 3)")

  with pytest.raises(ValueError) as e:   # a resnet18 file offered as resnet34
    convert.variables_from_state_dict(state, "resnet34")
  _one_line_error(e, "missing", "layer1.2.bn1.bias (64,)", "(+77 more)")

  with pytest.raises(ValueError) as e:   # the head does not match --num-classes
    convert.variables_from_state_dict(state, "resnet18", num_classes=1000)
  _one_line_error(e, "fc.weight", "(10, 512)", "(1000, 512)")


def test_verify_names_the_bad_leaf():
  variables = random_variables("resnet18", 10)
  variables["params"]["stage1_block1"]["conv1"]["kernel"] = np.zeros((1, 1, 64, 64), np.float32)
  with pytest.raises(ValueError) as e:
    weights_file.verify(variables, "resnet18")
  _one_line_error(e, "params/stage1_block1/conv1/kernel", "(1, 1, 64, 64)", "(3, 3, 64, 64)")


def test_files_that_are_not_what_was_promised(tmp_path):
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x00" * 64)
  for fn in (weights_file.load, convert.read_state_dict):
    with pytest.raises(ValueError) as e:
      fn(str(garbage))
    _one_line_error(e, str(garbage), "not a safetensors file")
  # A torch-layout file is not ours, and ours is not a torch state dict.
  torch_file = str(tmp_path / "tv.safetensors")
  weights_file.write_safetensors(
      torch_file, convert.torch_state_dict(random_variables("resnet18", 3), "resnet18"),
      {"format": "pt"})
  with pytest.raises(ValueError) as e:
    weights_file.load(torch_file)
  _one_line_error(e, torch_file, "not a resnet_jax weights file")
  ours = str(tmp_path / "ours.safetensors")
  weights_file.save(ours, random_variables("resnet18", 3), "resnet18",
                    weights_file.PREPROCESSING["torchvision"], "test")
  with pytest.raises(ValueError) as e:
    convert.read_state_dict(ours)
  _one_line_error(e, ours, "resnet_jax weights file")
  with pytest.raises(ValueError) as e:
    convert.read_state_dict(str(tmp_path / "absent.safetensors"))
  _one_line_error(e, "no such file")


def test_pth_without_torch_is_one_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)    # `import torch` raises ImportError
  with pytest.raises(ValueError) as e:
    convert.read_state_dict(str(path))
  _one_line_error(e, str(path), "needs torch")


@pytest.mark.parametrize("argv,needle", [
    (["import", "--model", "resnet51", "--from", "torchvision", "IN", "OUT.safetensors"],
     "resnet51"),
    (["import", "--model", "resnet50_v1", "--from", "torchvision", "IN", "OUT.safetensors"],
     "use --from keras"),
    (["import", "--model", "resnet50", "--from", "keras", "IN", "OUT.safetensors"],
     "no Keras counterpart"),
    (["import", "--model", "resnet18", "--from", "torchvision", "IN", "OUT.h5"],
     "must end with .safetensors"),
    (["import", "--model", "resnet18", "--from", "torchvision", "absent.pth", "O.safetensors"],
     "absent.pth: no such file"),
    (["import", "--model", "resnet18", "--from", "timm", "IN", "O.safetensors",
      "--preprocessing", "{crop"], "--preprocessing is not JSON"),
    (["export", "absent.safetensors", "O.safetensors"], "no such file"),
    (["from-run", "absent_workdir", "O.safetensors"], "absent_workdir: no such directory"),
    # a directory that is not a run's workdir
    (["from-run", os.path.join(REPO, "tests"), "O.safetensors"],
     "tests: no checkpoints in checkpoints/"),
    (["from-run", "--best", os.path.join(REPO, "tests"), "O.safetensors"],
     "tests: no best checkpoint"),
    (["from-run", os.path.join(REPO, "tests"), "O.h5"], "must end with .safetensors"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("convert: error:") and "\n" not in err
  assert needle in err


# --------------------------------------------------------------------------------- the CLI

def _run(*args):
  return subprocess.run([sys.executable, "-m", "resnet_jax.convert", *args], cwd=REPO,
                        env=cli_env(1), capture_output=True, text=True, timeout=300)


def test_cli_import_then_export_returns_the_same_tensors(tmp_path):
  original = convert.torch_state_dict(random_variables("resnet20_b", 10), "resnet20_b")
  tv_in, ours, tv_out = (str(tmp_path / n) for n in
                         ("in.safetensors", "ours.safetensors", "out.safetensors"))
  weights_file.write_safetensors(tv_in, original, {"format": "pt"})
  result = _run("import", "--model", "resnet20_b", "--from", "timm", tv_in, ours,
                "--preprocessing", '{"image_size": 32, "crop_pct": 1.0}')
  assert result.returncode == 0, result.stderr
  assert "resnet20_b, 10 classes" in result.stdout      # num_classes read from fc.weight
  variables, info = weights_file.load(ours)
  assert info["num_classes"] == 10 and info["preprocessing"]["image_size"] == 32
  assert info["preprocessing"]["interpolation"] == "bicubic"      # the rest from timm's table
  assert info["source"].startswith("timm:resnet20_b in.safetensors sha256=")
  result = _run("export", "--model", "resnet20_b", ours, tv_out)
  assert result.returncode == 0, result.stderr
  exported = convert.read_state_dict(tv_out)
  assert exported.keys() == original.keys()
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  # A shape error through `python -m`: exit 2, one line naming key and shapes.
  result = _run("import", "--model", "resnet20_b", "--from", "torchvision", "--num-classes",
                "5", tv_in, str(tmp_path / "bad.safetensors"))
  assert result.returncode == 2
  err = result.stderr.strip().splitlines()
  assert len(err) == 1 and "fc.weight" in err[0] and "(10, 64)" in err[0] and "(5, 64)" in err[0]
  assert not os.path.exists(tmp_path / "bad.safetensors")


def test_keras_num_classes_is_read_from_the_dense_kernel(tmp_path):
  h5py = pytest.importorskip("h5py")
  path = str(tmp_path / "m.weights.h5")
  with h5py.File(path, "w") as f:
    f["layers/conv1_conv/vars/0"] = np.zeros((7, 7, 3, 64), np.float32)
    f["layers/predictions/vars/0"] = np.zeros((2048, 12), np.float32)
    f["layers/predictions/vars/1"] = np.zeros((12,), np.float32)
  assert convert._keras_num_classes(path) == 12



# ------------------------------------------------------- written files follow the umask

@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
  """The process umask set to the parameter for the test, restored afterwards."""
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path):
  return os.stat(path).st_mode & 0o777


def test_weight_files_follow_the_umask(umask, tmp_path, capsys):
  """Every way a weights file is written: the helper, save, and the CLI's import and
  export (in this process, and `python -m` for export). 0644 under 022, 0640 under 027,
  as a file created with open() gets; no temporary file is left beside them."""
  expected = 0o666 & ~umask
  with open(tmp_path / "plain", "w"):
    pass
  assert _mode(tmp_path / "plain") == expected == {0o022: 0o644, 0o027: 0o640}[umask]
  original = convert.torch_state_dict(random_variables("resnet20_b", 10), "resnet20_b")
  helper = str(tmp_path / "helper.safetensors")
  weights_file.write_safetensors(helper, original, {"format": "pt"})
  saved = str(tmp_path / "saved.safetensors")
  weights_file.save(saved, random_variables("resnet20_b", 10), "resnet20_b",
                    weights_file.PREPROCESSING["timm"], "test")
  imported, exported = str(tmp_path / "imported.safetensors"), str(tmp_path / "tv.safetensors")
  assert cli.main(["import", "--model", "resnet20_b", "--from", "timm", helper, imported]) == 0
  assert cli.main(["export", imported, exported]) == 0
  capsys.readouterr()
  result = _run("export", imported, str(tmp_path / "tv_cli.safetensors"))  # inherits the umask
  assert result.returncode == 0, result.stderr
  written = ["helper", "saved", "imported", "tv", "tv_cli"]
  assert {n: oct(_mode(tmp_path / f"{n}.safetensors")) for n in written} == \
      {n: oct(expected) for n in written}
  assert sorted(os.listdir(tmp_path)) == sorted(["plain", *(f"{n}.safetensors" for n in written)])
  assert np.array_equal(convert.read_state_dict(exported)["fc.weight"], original["fc.weight"])


def test_a_stale_temporary_file_does_not_decide_the_mode(umask, tmp_path):
  """A temporary file a killed writer with the same pid left (any mode) is replaced."""
  path = str(tmp_path / "w.safetensors")
  stale = f"{path}.tmp-{os.getpid()}"
  with open(stale, "w") as f:
    f.write("half a file")
  os.chmod(stale, 0o600)
  weights_file.write_safetensors(path, {"x": np.arange(3, dtype=np.float32)}, {})
  assert _mode(path) == 0o666 & ~umask
  assert os.listdir(tmp_path) == ["w.safetensors"]
  assert np.array_equal(convert.read_state_dict(path)["x"], np.arange(3, dtype=np.float32))


# ------------------------------------------------------------------------------ .pth files

def test_pth_is_read_with_weights_only_in_the_torch_interpreter(tmp_path):
  """resnet_jax/convert/torch_pickle.py needs only numpy and torch, so it is checked where
  torch is: the PyTorch interpreter ./launch.sh test sets up (TensorFlow and torch in one
  process crash). Unwrapped DataParallel checkpoints, exact values, bfloat16 as float32,
  weights_only=True always, a pickled object refused in one line (tests/torch_side.py)."""
  torch_python = os.environ.get("RESNET_JAX_TORCH_PYTHON", "")
  if not torch_python:
    pytest.skip("RESNET_JAX_TORCH_PYTHON is not set (./launch.sh test sets it)")
  module = os.path.join(REPO, "resnet_jax", "convert", "torch_pickle.py")
  proc = subprocess.run([torch_python, os.path.join(REPO, "tests", "torch_side.py"),
                         "read-pth", module, str(tmp_path)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_pth_without_torch_is_one_line_naming_the_file_and_the_way_on(tmp_path, monkeypatch):
  path = str(tmp_path / "r18.pth")
  with open(path, "wb") as f:
    f.write(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)      # as if torch were not installed
  with pytest.raises(ValueError) as e:
    convert.read_state_dict(path)
  _one_line_error(e, path, "needs torch (pip install torch)")


def test_torchvision_v2_files_are_recorded_for_their_232_resize(tmp_path):
  """torchvision's IMAGENET1K_V2 weights are evaluated at 224 of 232 (its transforms'
  resize_size); V1 files at 224 of 256. Known by the file names torchvision ships."""
  from resnet_jax.convert import weights_file
  v2 = weights_file.preprocessing_for("torchvision", "resnet50", "/x/resnet50-11ad3fa6.pth")
  v1 = weights_file.preprocessing_for("torchvision", "resnet50", "/x/resnet50-0676ba61.pth")
  assert round(224 / v2["crop_pct"]) == 232 and round(224 / v1["crop_pct"]) == 256
  from resnet_jax.data import imagenet_preprocess
  assert imagenet_preprocess.eval_resize_size(224, v2["crop_pct"]) == 232
