"""Checkpoints: writing on several devices of one process (no replica-parallel slicing), and
corruption never passing silently (checksums, unreadable saves, stray files), on real files."""

import glob
import json
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_jax.config_schema import base_config
from resnet_jax.training import checkpoints as ckpt_lib
from resnet_jax.training.checkpoints import Checkpoints

from conftest import REPO, cli_env

# Saves a replicated state on 8 CPU devices twice -- with Orbax's default jax.Array handler,
# then through Checkpoints -- counting XLA compilations during each save, and reads the
# second back. Orbax's default writes each replicated array replica-parallel: one eager
# slice per replica, compiled per shape.
SAVE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from resnet_jax.config_schema import base_config
    from resnet_jax.training.checkpoints import Checkpoints, checksums

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())
    rng = np.random.default_rng(0)
    state = {f"w{i}": jax.device_put(rng.standard_normal((8 * (i + 1), 3)).astype(np.float32),
                                     replicated) for i in range(12)}
    workdir = sys.argv[1]

    def counted_save(save):
      before = len(compiles)
      save()
      return len(compiles) - before

    checkpointer = ocp.StandardCheckpointer()
    default = counted_save(lambda: (checkpointer.save(workdir + "/default", state),
                                    checkpointer.wait_until_finished()))
    checkpointer.close()
    cfg = base_config().checkpoint
    ckpts = Checkpoints(workdir + "/ours", cfg)
    checksums(state)   # the save's checksum function, compiled once for this state, not counted
    ours = counted_save(lambda: (ckpts.save(1, state, {"step": 1}, force=True),
                                 ckpts.manager.wait_until_finished()))
    back = ckpts.read(1)
    ckpts.close()
    same = all(np.array_equal(np.asarray(back[k]), np.asarray(v)) for k, v in state.items())
    print(json.dumps({"default": default, "ours": ours, "same": same}))
""")


def test_one_process_saves_replicated_arrays_without_slicing_them(tmp_path):
  # Without the session's persistent compilation cache: a hit there would hide a compile.
  env = {k: v for k, v in cli_env(8).items() if not k.startswith("JAX_COMPILATION_CACHE")}
  proc = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["default"] >= 12, result   # the default compiles a slice per array shape
  assert result["ours"] == 0, result
  assert result["same"], result


# ------------------------------------------------------------------ corruption is never silent

KERNEL = "params/stage1_block1/conv1/kernel"


def _state(seed: int) -> dict:
  """A small state shaped like a model's. The kernel's bits are random (finite floats: the
  top exponent bit is clear), so zstd cannot compress it and stores it verbatim: its bytes
  can be found, and one of them flipped, in the file Orbax wrote."""
  rng = np.random.default_rng(seed)
  bits = rng.integers(0, 2**32, (3, 3, 16, 16), dtype=np.uint32) & np.uint32(0xBFFFFFFF)
  return {"params": {"stage1_block1": {"conv1": {"kernel": jnp.asarray(bits.view(np.float32))},
                                       "bn1": {"scale": jnp.asarray(rng.standard_normal(16),
                                                                    jnp.bfloat16)}}},
          "step": jnp.int32(seed)}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _saved(workdir, *steps) -> None:
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  for step in steps:
    ckpts.save(step, _state(step), {"step": step}, force=True)
  ckpts.close()


def _kernel_bytes_in(step_dir, state) -> tuple[str, int]:
  """(file, offset) of the kernel's raw bytes among the files Orbax wrote for `step_dir`."""
  raw = np.asarray(state["params"]["stage1_block1"]["conv1"]["kernel"]).tobytes()
  for path in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        offset = f.read().find(raw)
      if offset >= 0:
        return path, offset
  raise AssertionError(f"the kernel's bytes are in no file under {step_dir}")


def _log_lines(capsys) -> list[str]:
  return [line for line in capsys.readouterr().out.splitlines() if "checkpoint" in line]


def test_a_flipped_byte_in_array_data_is_caught_and_the_step_moved_aside(tmp_path, capsys):
  workdir = str(tmp_path)
  _saved(workdir, 2, 4)
  path, offset = _kernel_bytes_in(os.path.join(workdir, "checkpoints", "4"), _state(4))
  with open(path, "r+b") as f:   # one bit of element 100's mantissa
    f.seek(offset + 100 * 4 + 1)
    byte = f.read(1)[0]
    f.seek(offset + 100 * 4 + 1)
    f.write(bytes([byte ^ 0x01]))
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  try:
    # What Orbax alone gives: no error, one weight changed.
    raw = ckpts.manager.restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(_state(4)))))["state"]
    changed = (np.asarray(raw["params"]["stage1_block1"]["conv1"]["kernel"]) !=
               np.asarray(_state(4)["params"]["stage1_block1"]["conv1"]["kernel"]))
    assert changed.sum() == 1 and changed.reshape(-1)[100], "the flip lands in element 100"
    with pytest.raises(ckpt_lib.ChecksumMismatch, match=KERNEL):
      ckpts.read(4)
    capsys.readouterr()
    state, step = ckpts.restore_latest(_abstract(_state(4)), expect={})
  finally:
    ckpts.close()
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, state, _state(2))
  moved = glob.glob(os.path.join(workdir, "checkpoints_corrupt", "4-*"))
  assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "state")), "kept, not deleted"
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "4"))
  lines = _log_lines(capsys)
  assert len(lines) == 1, lines
  line = lines[0]
  assert line.startswith("checkpoint step 4 is unreadable (ChecksumMismatch: " + KERNEL), line
  assert "expected " in line and "found " in line and moved[0] in line, line
  assert line.endswith("falling back to step 2"), line


def test_a_file_where_a_step_directory_belongs_is_moved_aside_not_deleted(tmp_path, capsys):
  workdir = str(tmp_path)
  _saved(workdir, 2)
  for folder, name in (("checkpoints", "6"), ("checkpoints_best", "7")):
    os.makedirs(os.path.join(workdir, folder), exist_ok=True)
    with open(os.path.join(workdir, folder, name), "w") as f:
      f.write(f"not a checkpoint {name}")
  capsys.readouterr()
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  lines = _log_lines(capsys)
  try:
    assert ckpts.all_steps() == [2]
    ckpts.save(6, _state(6), {"step": 6}, force=True)   # Orbax deleted the file here before
  finally:
    ckpts.close()
  assert len(lines) == 2, lines
  corrupt = os.path.join(workdir, "checkpoints_corrupt")
  for name, moved_as, line in (("6", "6-", lines[0]), ("7", "best-7-", lines[1])):
    [moved] = glob.glob(os.path.join(corrupt, moved_as + "*"))
    with open(moved) as f:
      assert f.read() == f"not a checkpoint {name}"
    assert line.startswith(f"checkpoint step {name} in ") and "is a file of" in line, line
    assert moved in line, line
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))


def test_a_save_without_checksums_still_restores(tmp_path, capsys):
  """A checkpoint written before checksums existed: its meta has none; nothing is checked."""
  workdir = str(tmp_path)
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  ckpts.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(3)),
                                                meta=ocp.args.JsonSave({"step": 3})))
  ckpts.close()
  capsys.readouterr()
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  try:
    assert "checksums" not in ckpts.read_meta(3)
    state, step = ckpts.restore_latest(_abstract(_state(3)), expect={"step": 3})
    read = ckpts.read(3)
  finally:
    ckpts.close()
  assert step == 3 and not _log_lines(capsys)
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  jax.tree.map(np.testing.assert_array_equal, read, _state(3))


def _sum(x) -> str:
  return ckpt_lib.checksums({"x": x})["x"]


@pytest.mark.parametrize("dtype,shape", [("float32", (7, 5, 3)), ("bfloat16", (33,)),
                                         ("int32", (4, 9)), ("float32", ())])
def test_the_checksum_sees_any_one_element_change_and_any_swap(dtype, shape):
  rng = np.random.default_rng(zlib.crc32(f"{dtype}{shape}".encode()))
  unsigned = {"float32": np.uint32, "bfloat16": np.uint16, "int32": np.uint32}[dtype]
  width = np.dtype(unsigned).itemsize * 8
  bits = rng.integers(0, 2**width, shape, dtype=np.uint64).astype(unsigned)
  as_array = lambda b: jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.dtype(dtype))  # noqa: E731
  original = _sum(as_array(bits))
  assert original.startswith(dtype + ":")
  flat = bits.reshape(-1)
  for _ in range(12):   # one element: a random new value, and one flipped bit (any bit)
    i = rng.integers(flat.size)
    for new in (rng.integers(0, 2**width, dtype=np.uint64).astype(unsigned),
                flat[i] ^ unsigned(1 << int(rng.integers(width)))):
      if new == flat[i]:
        continue
      changed = flat.copy()
      changed[i] = new
      assert _sum(as_array(changed.reshape(shape))) != original, (i, new)
  if flat.size < 2:
    return
  for _ in range(12):   # two elements swapped: random ones, and x with x's sign flipped
    i, j = rng.choice(flat.size, 2, replace=False)
    for pair in (flat, np.where(np.arange(flat.size) == j,
                                flat[i] ^ unsigned(1 << (width - 1)), flat)):
      if pair[i] == pair[j]:
        continue
      swapped = pair.copy()
      swapped[i], swapped[j] = pair[j], pair[i]
      assert _sum(as_array(swapped.reshape(shape))) != _sum(as_array(pair.reshape(shape)))


# On 8 CPU devices: the checksums of arrays sharded several ways equal those of the same
# arrays on one device; a sharded state saves and reads back (read() verifies).
SHARDED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from resnet_jax.config_schema import base_config
    from resnet_jax.training import checkpoints

    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((16, 6, 3)).astype(np.float32),
              "bf16": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
              "i32": rng.integers(-2**31, 2**31, (24,), dtype=np.int64).astype(np.int32),
              "scalar": np.float32(2.5)}
    one = {k: jax.device_put(v, jax.devices()[0]) for k, v in arrays.items()}
    flat = Mesh(np.asarray(jax.devices()), ("data",))
    grid = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("a", "b"))
    layouts = {"data": lambda x: NamedSharding(flat, P("data") if x.ndim else P()),
               "grid": lambda x: NamedSharding(grid, P("a", "b") if x.ndim > 1 else P()),
               "replicated": lambda x: NamedSharding(flat, P())}
    result = {"one": checkpoints.checksums(one)}
    for name, layout in layouts.items():
      sharded = {k: jax.device_put(v, layout(v)) for k, v in one.items()}
      result[name] = checkpoints.checksums(sharded)
    ckpts = checkpoints.Checkpoints(sys.argv[1], base_config().checkpoint)
    ckpts.save(1, sharded, {"step": 1}, force=True)
    ckpts.manager.wait_until_finished()
    back = ckpts.read(1)
    ckpts.close()
    result["read_back"] = checkpoints.checksums(back)
    result["shards"] = len(sharded["f32"].addressable_shards)
    print(json.dumps(result))
""")


def test_the_checksum_does_not_depend_on_the_sharding(tmp_path):
  proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path)], cwd=REPO,
                        env=cli_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result.pop("shards") == 8
  one = result.pop("one")
  assert set(one) == {"f32", "bf16", "i32", "scalar"}
  for name, sums in result.items():
    assert sums == one, name


def test_an_unreadable_save_is_named_in_one_readable_line(tmp_path, capsys):
  workdir = str(tmp_path)
  _saved(workdir, 2, 4)
  path, _ = _kernel_bytes_in(os.path.join(workdir, "checkpoints", "4"), _state(4))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  capsys.readouterr()
  ckpts = Checkpoints(workdir, base_config().checkpoint)
  try:
    _, step = ckpts.restore_latest(_abstract(_state(4)), expect={})
  finally:
    ckpts.close()
  assert step == 2
  [moved] = glob.glob(os.path.join(workdir, "checkpoints_corrupt", "4-*"))
  lines = _log_lines(capsys)
  assert len(lines) == 1, lines
  line = lines[0]
  assert line.startswith("checkpoint step 4 is unreadable (ValueError: "), line
  assert line.endswith(f"); moved it to {moved} and falling back to step 2"), line
  assert "params.stage1_block1.conv1.kernel" in line, line   # TensorStore's name of the array
  for noise in ("pybind", "<bound method", "tensorstore_spec", "slice(", "TensorStore({"):
    assert noise not in line, line
  assert len(line) < 500, line


def test_a_long_reason_is_shortened_at_word_boundaries():
  words = [f"word{i}" for i in range(200)]
  cause = ValueError("DATA_LOSS: " + " ".join(words) + " [tensorstore_spec='{...}']")
  try:
    try:
      raise cause
    except ValueError as e:
      raise Exception("Encountered error while reading array index: (slice(0, 3, 1),). See "
                      "full TensorStore details: <bound method pybind11_x.spec of ...>") from e
  except Exception as e:   # noqa: BLE001
    reason = ckpt_lib.failure_reason(e)
  assert reason.startswith("ValueError: DATA_LOSS: word0 word1 ") and " ... " in reason
  assert reason.endswith(" word199"), reason
  assert len(reason) <= 320, reason
  kept = reason[len("ValueError: DATA_LOSS: "):].replace(" ... ", " ").split()
  assert set(kept) <= set(words), "no word is cut"


def test_close_waits_for_the_start_up_cleanup_thread(tmp_path):
  """Orbax starts a thread that cleans up leftover temporary folders when a manager is
  created, and its close() does not wait for it: a run refused right after start-up then
  reached interpreter shutdown with the thread alive, which died printing "cannot schedule
  new futures after shutdown" after our error line. close() must leave no such thread."""
  import threading
  cfg = base_config().checkpoint
  (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a leftover

  def cleaners():
    return [t for t in threading.enumerate()
            if t.is_alive() and "_target_setting_result" in t.name]

  for _ in range(5):
    ckpts = Checkpoints(str(tmp_path), cfg)
    ckpts.close()
    assert cleaners() == []
  assert not (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1").exists()
