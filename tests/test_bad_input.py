"""Bad input: one line naming the culprit, a non-zero exit, nothing already saved lost.

Each case runs `resnet_jax.main.main(argv)`, the function behind `python -m resnet_jax`.
"""

import json
import os

import pytest

from resnet_jax import main as cli

from conftest import DEFAULT_CONFIG, run_cli

CFG = f"--config={DEFAULT_CONFIG}"


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


# (argv after the config flag, text the error line must contain)
OVERRIDE_CASES = [
    # unknown keys
    (["--config.data.batchsize=64"], "'data.batchsize'"),
    (["--config.optimiser.learning_rate=0.1"], "'optimiser.learning_rate'"),
    (["--config.model.nme=resnet8"], "'model.nme'"),
    (["--config.lr=0.1"], "'lr'"),
    (["--config.checkpoint.every=10"], "'checkpoint.every'"),
    (["--config.schedule.warmup=1"], "'schedule.warmup'"),
    (["--config.data.augment.flip=true"], "'data.augment.flip'"),
    # wrong types
    (["--config.data.batch_size=sixty"], "'data.batch_size' must be an int"),
    (["--config.data.batch_size=64.5"], "'data.batch_size' must be an int"),
    (["--config.optimizer.learning_rate=fast"], "'optimizer.learning_rate' must be a float"),
    (["--config.optimizer.nesterov=perhaps"], "'optimizer.nesterov' must be a bool"),
    (["--config.num_epochs=[1]"], "'num_epochs' must be a float"),
    (["--config.schedule.decay_epochs=a,b"], "'schedule.decay_epochs' must be a tuple"),
    (["--config.seed=0x"], "'seed' must be an int"),
    # impossible values
    (["--config.data.batch_size=0"], "'data.batch_size'=0"),
    (["--config.data.batch_size=-8"], "'data.batch_size'=-8"),
    (["--config.data.eval_batch_size=-1"], "'data.eval_batch_size'=-1"),
    (["--config.model.name=resnet51"], "'model.name'='resnet51'"),
    (["--config.model.dtype=float8"], "'model.dtype'='float8'"),
    (["--config.data.dataset=imagenet3000"], "'data.dataset'='imagenet3000'"),
    (["--config.schedule.name=linear"], "'schedule.name'='linear'"),
    (["--config.optimizer.momentum=1.0"], "'optimizer.momentum'=1.0"),
    (["--config.optimizer.learning_rate=-0.1"], "'optimizer.learning_rate'=-0.1"),
    (["--config.optimizer.weight_decay=-1"], "'optimizer.weight_decay'=-1.0"),
    (["--config.optimizer.label_smoothing=1.0"], "'optimizer.label_smoothing'=1.0"),
    (["--config.schedule.decay_factor=0"], "'schedule.decay_factor'=0.0"),
    (["--config.schedule.decay_epochs=60,30"], "'schedule.decay_epochs'=(60.0, 30.0)"),
    (["--config.num_epochs=0"], "'num_epochs'=0.0"),
    (["--config.model.bn_momentum=1.5"], "'model.bn_momentum'=1.5"),
    (["--config.mesh.data=3"], "'mesh.data'=3"),
    (["--config.nan_policy=ignore"], "'nan_policy'='ignore'"),
    (["--config.checkpoint.keep=0"], "'checkpoint.keep'=0"),
    (["--config.checkpoint.best_mode=median"], "'checkpoint.best_mode'='median'"),
    (["--config.log_every_steps=0"], "'log_every_steps'=0"),
    (["--config.data.batch_size=4096"], "'data.batch_size'=4096"),  # > train split
    (["--config.data.train_split=training"], "'data.train_split'='training'"),
    (["--config.data.eval_split=validation"], "'data.eval_split'='validation'"),
    (["--config.data.dataset=image_folder"], "'data.image_folder'"),
    (["--config.data.dataset=image_folder", "--config.data.image_folder=/nonexistent",
      "--config.data.image_size=32"], "/nonexistent is not a directory"),
    (["--config.data.corrupt_images=ignore"], "'data.corrupt_images'='ignore'"),
    (["--config.data.mean=1,2,3", "--config.data.std=1"], "'data.std'"),
    # flags
    (["--workdirr=/tmp/x"], "unknown flag --workdirr"),
    (["train"], "cannot parse argument 'train'"),
]


@pytest.mark.parametrize("argv,expected", OVERRIDE_CASES, ids=[c[1] for c in OVERRIDE_CASES])
def test_bad_override(argv, expected, data_dir, tmp_path, capsys):
  workdir = tmp_path / "w"
  code = cli.main([CFG, f"--config.data.data_dir={data_dir}", *argv, f"--workdir={workdir}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert err and err[-1].startswith("resnet_jax: error: ") and expected in err[-1], err
  assert "Traceback" not in "\n".join(err)
  assert not (workdir / "checkpoints").exists()


TYPO_CONFIG = """from resnet_jax.config_schema import base_config
def get_config():
  c = base_config()
  c.optimizer.lr = 0.1
  return c
"""
BAD_FILES = {  # file name -> (contents or None for missing, expected text)
    "missing.py": (None, "config file not found"),
    "noget.py": ("x = 1\n", "defines no get_config()"),
    "syntax.py": ("def get_config(:\n", "failed to load"),
    "raises.py": ("def get_config():\n  return 1/0\n", "get_config() failed: ZeroDivisionError"),
    "dict.py": ("def get_config():\n  return {}\n", "must return an ml_collections.ConfigDict"),
    "typo.py": (TYPO_CONFIG,
                "unknown config key 'optimizer.lr' (did you mean 'optimizer.learning_rate'?)"),
}


def _file_cases(tmp_path):
  cases = []
  for name, (text, expected) in BAD_FILES.items():
    path = str(tmp_path / name) if text is None else _write(tmp_path / name, text)
    cases.append(([f"--config={path}"], expected))
  cases.append((["--config.seed=1"], "missing --config=FILE"))
  return cases


def test_bad_config_files(tmp_path, capsys):
  for argv, expected in _file_cases(tmp_path):
    code = cli.main(argv + [f"--workdir={tmp_path}/w"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and expected in err[-1], (argv, err)


@pytest.mark.parametrize("manual_dir", [False, True])
def test_a_failed_download_says_which_files_manual_dir_must_hold(manual_dir, tmp_path,
                                                                 capsys, monkeypatch):
  """TFDS's own download is tried as users expect; only when it fails (simulated here:
  tests never download) one line names the files data.manual_dir must hold."""
  import requests
  import tensorflow_datasets as tfds
  tried = []

  def offline(builder, download_config=None, **kwargs):
    tried.append((builder.name, download_config.manual_dir))
    raise requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='storage.googleapis.com', port=443): Max retries exceeded"
        "\n(more lines TFDS would print)")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  extra = [f"--config.data.manual_dir={tmp_path}"] if manual_dir else []
  code = cli.main([CFG, "--config.data.dataset=mnist", f"--config.data.data_dir={tmp_path}/d",
                   *extra, f"--workdir={tmp_path}/w"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and tried == [("mnist", str(tmp_path) if manual_dir else None)]
  files = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
           "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
  where = (f"{tmp_path} must hold {files}" if manual_dir else
           f"put {files} in a folder and set --config.data.manual_dir=FOLDER")
  assert err == [f"resnet_jax: error: dataset 'mnist' could not be prepared in {tmp_path}/d "
                 "(ConnectionError: HTTPSConnectionPool(host='storage.googleapis.com', "
                 f"port=443): Max retries exceeded); {where}"], err
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("extra,expected", [
    (["--config.data.dataset=mnist", "--config.data.data_dir={tmp}/empty",
      "--config.data.manual_dir={tmp}/no_such_dir"],
     "'data.manual_dir': {tmp}/no_such_dir does not exist"),
    (["--config.data.dataset=mnist", "--config.data.data_dir={tmp}/empty",
      f"--config.data.manual_dir={DEFAULT_CONFIG}"],
     f"'data.manual_dir': {DEFAULT_CONFIG} is not a directory"),
    (["--config.data.data_dir=/proc/no_such_data_dir"], "'data.data_dir'"),
    (["--workdir=/proc/no_such_workdir"], "workdir /proc/no_such_workdir is not writable"),
])
def test_missing_data_or_unusable_dirs(extra, expected, tmp_path, capsys):
  extra = [e.format(tmp=tmp_path) for e in extra]
  if not any(e.startswith("--workdir") for e in extra):
    extra.append(f"--workdir={tmp_path}/w")
  code = cli.main([CFG, *extra])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and expected.format(tmp=tmp_path) in err[-1], err


def test_checkpoint_of_a_different_model_is_refused_and_kept(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  base = [CFG, f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
          "--config.num_train_steps=6", "--config.stop_after_steps=3"]
  first = run_cli(base + ["--config.model.name=resnet8"])
  assert first.returncode == 0, first.stderr[-2000:]
  config_before = open(os.path.join(workdir, "config.json")).read()
  second = run_cli(base + ["--config.model.name=resnet20"])
  assert second.returncode == 2
  line = second.stderr.strip().splitlines()[-1]
  assert "model='resnet8'" in line and "model='resnet20'" in line and "--workdir" in line
  # Nothing lost: the checkpoint and the resolved config of the first run are untouched.
  assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  assert json.loads(config_before)["model"]["name"] == "resnet8"
