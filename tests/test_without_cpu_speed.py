"""resnet_jax/cpu_speed is optional: delete it and the codebase still works, only slower on
CPU. Proven on a copy of the package without that folder (nothing mocked): the default
experiment trains to its stated result (configs/digits_resnet20.py: >= 97% top-1)."""

import os
import shutil
import subprocess
import sys

from conftest import DEFAULT_CONFIG, REPO, cli_env

# An editable install (`pip install -e .`, as launch.sh makes) puts a finder in
# sys.meta_path that maps resnet_jax's submodules to the checkout: it would find
# resnet_jax.cpu_speed there even when the copy on PYTHONPATH has none. The children run
# without it, so only the copy can be imported.
_WITHOUT_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' "
                     "not in getattr(f, '__name__', type(f).__name__)]; ")


def test_the_default_experiment_reaches_its_result_without_the_cpu_speed_package(
    data_dir, tmp_path):
  package = tmp_path / "src" / "resnet_jax"
  shutil.copytree(os.path.join(REPO, "resnet_jax"), package,
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.rmtree(package / "cpu_speed")
  env = cli_env(1, PYTHONPATH=str(package.parent))
  # Only the copy can be imported: a cpu_speed import anywhere would fail the run.
  probe = subprocess.run([sys.executable, "-c", _WITHOUT_EDITABLE +
                          "import resnet_jax, importlib.util; "
                          "print(resnet_jax.__file__, importlib.util.find_spec("
                          "'resnet_jax.cpu_speed'))"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
  assert probe.stdout.split() == [str(package / "__init__.py"), "None"], probe.stdout
  workdir = tmp_path / "run"
  run_module = _WITHOUT_EDITABLE + ("import runpy; runpy.run_module('resnet_jax', "
                                    "run_name='__main__', alter_sys=True)")
  proc = subprocess.run([sys.executable, "-c", run_module, f"--config={DEFAULT_CONFIG}",
                         f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "lowering native (resnet_jax.cpu_speed is not installed" in proc.stdout
  final = proc.stdout.strip().splitlines()[-1]
  top1 = float(final.split("top1=")[1].split(",")[0])
  assert top1 >= 0.97, final
