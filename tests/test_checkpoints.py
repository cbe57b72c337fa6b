"""Checkpoint writing on several devices of one process: no replica-parallel slicing."""

import json
import subprocess
import sys
import textwrap

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
    from resnet_jax.training.checkpoints import Checkpoints

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
