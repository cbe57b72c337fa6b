"""Bad input: one line naming the culprit, a non-zero exit, nothing already saved lost.

Each case runs `resnet_jax.main.main(argv)`, the function behind `python -m resnet_jax`.
"""

import json
import os

import pytest

from resnet_jax import main as cli

from conftest import DEFAULT_CONFIG, REPO, run_cli

CFG = f"--config={DEFAULT_CONFIG}"


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


# One row per malformed invocation: (arguments, text the one error line must contain).
# {cfg} is the default config flag, {cfg_path} its file, {tmp} a fresh folder holding a
# config.json; a row starting with the config flag gets a prepared data_dir added. Every
# row must stop with exactly one line, exit 2, and create nothing: the workdir {tmp}/w
# must not appear.
CASES = [
    # --- the command line itself
    ([], "missing --config=FILE"),
    (["train"], "cannot parse argument 'train'"),
    ([""], "cannot parse argument ''"),
    (["{cfg}", "extra"], "cannot parse argument 'extra'"),
    (["--config"], "--config: expected a value"),
    (["--config="], "--config: expected a file, got an empty value"),
    (["{cfg}", "--workdir="], "--workdir: expected a directory, got an empty value"),
    (["{cfg}", "--workdir"], "--workdir: expected a value"),
    (["{cfg}", "--workdir", "--config.seed=1"], "--workdir: expected a value"),
    (["{cfg}", "--workdirr={tmp}/w"], "unknown flag --workdirr (did you mean '--workdir'?)"),
    (["{cfg}", "--work_dir={tmp}/w"], "unknown flag --work_dir"),
    (["{cfg}", "--cfg=x"], "unknown flag --cfg"),
    (["{cfg}", "{cfg}"], "--config given twice"),
    (["{cfg}", "--workdir={tmp}/w", "--workdir={tmp}/v"], "--workdir given twice"),
    (["{cfg}", "--config.seed"], "--config.seed: expected --config.seed=VALUE"),
    (["{cfg}", "--allow_config_change=yes"], "--allow_config_change takes no value"),
    (["{cfg}", "-n"], "cannot parse argument '-n'"),
    # --- the config file
    (["--config={tmp}/missing.py"], "config file {tmp}/missing.py not found"),
    (["--config={tmp}"], "config file {tmp} is a directory"),
    (["--config=README.md"], "README.md: expected a Python file (.py)"),
    (["--config={tmp}/config.json"], "a run's recorded config.json"),
    (["--config={cfg_path}:arg"], "get_config('arg') failed: TypeError"),
    (["--config=configs/cifar10.py:resnet21"], "get_config('resnet21') failed: ValueError"),
    (["--config=configs/cifar10.py:resnet20,png"], "expected MODEL or MODEL,jpeg"),
    (["--config=configs/mnist_resnet20.py:kmnist"], "expected one of mnist, fashion_mnist"),
    (["--config=configs/nonexistent.py:resnet20"], "configs/nonexistent.py not found"),
    # --- unknown keys
    (["{cfg}", "--config.data.batchsize=64"], "'data.batchsize' (did you mean 'data.batch_size'?)"),
    (["{cfg}", "--config.optimiser.learning_rate=0.1"], "'optimiser.learning_rate'"),
    (["{cfg}", "--config.model.nme=resnet8"], "'model.nme'"),
    (["{cfg}", "--config.lr=0.1"], "'lr'"),
    (["{cfg}", "--config.optimizer.lr=0.1"], "did you mean 'optimizer.learning_rate'?"),
    (["{cfg}", "--config.checkpoint.every=10"], "'checkpoint.every'"),
    (["{cfg}", "--config.schedule.warmup=1"], "'schedule.warmup'"),
    (["{cfg}", "--config.data.augment.flip=true"], "'data.augment.flip'"),
    (["{cfg}", "--config.epochs=3"], "'epochs'"),
    (["{cfg}", "--config.model=resnet8"], "'model'"),
    (["{cfg}", "--config.=3"], "unknown config key ''"),
    (["{cfg}", "--config.data.=3"], "unknown config key 'data.'"),
    (["{cfg}", "--config.mesh.model=2"], "'mesh.model'"),
    # --- wrong types
    (["{cfg}", "--config.data.batch_size=sixty"], "'data.batch_size' must be an int"),
    (["{cfg}", "--config.data.batch_size=64.5"], "'data.batch_size' must be an int"),
    (["{cfg}", "--config.data.batch_size="], "'data.batch_size' must be an int"),
    (["{cfg}", "--config.optimizer.learning_rate=fast"], "must be a float"),
    (["{cfg}", "--config.optimizer.learning_rate="], "must be a float"),
    (["{cfg}", "--config.optimizer.nesterov=perhaps"], "'optimizer.nesterov' must be a bool"),
    (["{cfg}", "--config.eval_only=2"], "'eval_only' must be a bool"),
    (["{cfg}", "--config.num_epochs=[1]"], "'num_epochs' must be a float"),
    (["{cfg}", "--config.schedule.decay_epochs=a,b"], "must be a tuple"),
    (["{cfg}", "--config.schedule.decay_steps=1.5,2"], "must be a tuple of int"),
    (["{cfg}", "--config.data.mean=(1,"], "'data.mean' must be a tuple"),
    (["{cfg}", "--config.seed=0x"], "'seed' must be an int"),
    (["{cfg}", "--config.seed=1e3"], "'seed' must be an int"),
    (["{cfg}", "--config.checkpoint.keep=three"], "'checkpoint.keep' must be an int"),
    (["{cfg}", "--config.data.random_flip=maybe"], "'data.random_flip' must be a bool"),
    # --- impossible values
    (["{cfg}", "--config.seed=-1"], "'seed'=-1: expected an int in [0, 2^31)"),
    (["{cfg}", "--config.seed=9223372036854775808"], "'seed'=9223372036854775808"),
    (["{cfg}", "--config.seed=4294967296"], "'seed'=4294967296"),
    (["{cfg}", "--config.data.batch_size=0"], "'data.batch_size'=0"),
    (["{cfg}", "--config.data.batch_size=-8"], "'data.batch_size'=-8"),
    (["{cfg}", "--config.data.batch_size=4096"], "'data.batch_size'=4096"),  # > train split
    (["{cfg}", "--config.data.eval_batch_size=-1"], "'data.eval_batch_size'=-1"),
    (["{cfg}", "--config.model.name=resnet51"], "'model.name'='resnet51'"),
    (["{cfg}", "--config.model.name="], "'model.name'=''"),
    (["{cfg}", "--config.model.dtype=float8"], "'model.dtype'='float8'"),
    (["{cfg}", "--config.data.dataset=imagenet3000"], "'data.dataset'='imagenet3000'"),
    (["{cfg}", "--config.schedule.name=linear"], "'schedule.name'='linear'"),
    (["{cfg}", "--config.schedule.warmup_shape=cosine"], "'schedule.warmup_shape'='cosine'"),
    (["{cfg}", "--config.schedule.warmup_factor=0"], "'schedule.warmup_factor'=0.0"),
    (["{cfg}", "--config.schedule.warmup_steps=-1"], "'schedule.warmup_steps'=-1"),
    (["{cfg}", "--config.schedule.decay_steps=60,30"], "'schedule.decay_steps'=(60, 30)"),
    (["{cfg}", "--config.optimizer.momentum=1.0"], "'optimizer.momentum'=1.0"),
    (["{cfg}", "--config.optimizer.momentum=-0.5"], "'optimizer.momentum'=-0.5"),
    (["{cfg}", "--config.optimizer.learning_rate=-0.1"], "'optimizer.learning_rate'=-0.1"),
    (["{cfg}", "--config.optimizer.learning_rate=nan"], "'optimizer.learning_rate'=nan"),
    (["{cfg}", "--config.optimizer.learning_rate=inf"], "expected a finite number"),
    (["{cfg}", "--config.optimizer.weight_decay=-1"], "'optimizer.weight_decay'=-1.0"),
    (["{cfg}", "--config.optimizer.label_smoothing=1.0"], "'optimizer.label_smoothing'=1.0"),
    (["{cfg}", "--config.optimizer.grad_accum_steps=0"], "'optimizer.grad_accum_steps'=0"),
    (["{cfg}", "--config.optimizer.grad_accum_steps=3"], "'optimizer.grad_accum_steps'=3"),
    (["{cfg}", "--config.optimizer.ema_decay=1.0"], "'optimizer.ema_decay'=1.0"),
    (["{cfg}", "--config.schedule.decay_factor=0"], "'schedule.decay_factor'=0.0"),
    (["{cfg}", "--config.schedule.decay_epochs=60,30"], "'schedule.decay_epochs'=(60.0, 30.0)"),
    (["{cfg}", "--config.num_epochs=0"], "'num_epochs'=0.0"),
    (["{cfg}", "--config.num_epochs=-3"], "'num_epochs'=-3.0"),
    (["{cfg}", "--config.num_epochs=inf"], "'num_epochs'=inf: expected a finite number"),
    (["{cfg}", "--config.num_epochs=nan"], "'num_epochs'=nan"),
    (["{cfg}", "--config.num_epochs=1e30"], "'num_epochs'=1e+30: expected at most"),
    (["{cfg}", "--config.num_train_steps=2147483648"], "'num_train_steps'=2147483648"),
    (["{cfg}", "--config.stop_after_steps=99999999999"], "'stop_after_steps'=99999999999"),
    (["{cfg}", "--config.eval_every_epochs=0"], "'eval_every_epochs'=0.0"),
    (["{cfg}", "--config.eval_every_epochs=inf"], "'eval_every_epochs'=inf"),
    (["{cfg}", "--config.eval_every_epochs=1e-9"], "'eval_every_epochs'=1e-09: expected at "
                                                   "least one step's worth"),
    (["{cfg}", "--config.eval_every_steps=0"], "'eval_every_steps'=0"),
    (["{cfg}", "--config.model.bn_momentum=1.5"], "'model.bn_momentum'=1.5"),
    (["{cfg}", "--config.model.bn_epsilon=-1"], "'model.bn_epsilon'=-1.0"),
    (["{cfg}", "--config.model.se_ratio=2"], "'model.se_ratio'=2.0"),
    (["{cfg}", "--config.model.drop_path_rate=1"], "'model.drop_path_rate'=1.0"),
    (["{cfg}", "--config.model.bn_group_size=7"], "'model.bn_group_size'=7"),
    (["{cfg}", "--config.mesh.data=3"], "'mesh.data'=3"),
    (["{cfg}", "--config.mesh.fsdp=3"], "'mesh.fsdp'=3"),
    (["{cfg}", "--config.mesh.fsdp=0"], "'mesh.fsdp'=0"),
    (["{cfg}", "--config.nan_policy=ignore"], "'nan_policy'='ignore'"),
    (["{cfg}", "--config.lowering=fast"], "'lowering'='fast'"),
    (["{cfg}", "--config.log_grad_norms=layer"], "'log_grad_norms'='layer'"),
    (["{cfg}", "--config.checkpoint.keep=0"], "'checkpoint.keep'=0"),
    (["{cfg}", "--config.checkpoint.every_steps=0"], "'checkpoint.every_steps'=0"),
    (["{cfg}", "--config.checkpoint.best_mode=median"], "'checkpoint.best_mode'='median'"),
    (["{cfg}", "--config.checkpoint.best_metric=top3"], "'checkpoint.best_metric'='top3'"),
    (["{cfg}", "--config.log_every_steps=0"], "'log_every_steps'=0"),
    (["{cfg}", "--config.data.crop_padding=-1"], "'data.crop_padding'=-1"),
    (["{cfg}", "--config.data.crop_pct=0"], "'data.crop_pct'=0.0"),
    (["{cfg}", "--config.data.crop_pct=1.5"], "'data.crop_pct'=1.5"),
    (["{cfg}", "--config.data.shuffle_buffer=-1"], "'data.shuffle_buffer'=-1"),
    (["{cfg}", "--config.data.prefetch=-1"], "'data.prefetch'=-1"),
    (["{cfg}", "--config.data.preprocess=resnet"], "'data.preprocess'='resnet'"),
    (["{cfg}", "--config.data.preprocess=imagenet"], "'data.image_size'=0"),
    (["{cfg}", "--config.data.channel_order=RBG"], "'data.channel_order'='RBG'"),
    (["{cfg}", "--config.data.process_sharding=host"], "'data.process_sharding'='host'"),
    (["{cfg}", "--config.data.image_size=-32"], "'data.image_size'=-32"),
    (["{cfg}", "--config.data.train_split=training"], "'data.train_split'='training'"),
    (["{cfg}", "--config.data.eval_split=validation"], "'data.eval_split'='validation'"),
    (["{cfg}", "--config.data.dataset=image_folder"], "'data.image_folder'"),
    (["{cfg}", "--config.data.dataset=image_folder", "--config.data.image_folder=/nonexistent",
      "--config.data.image_size=32"], "/nonexistent is not a directory"),
    (["{cfg}", "--config.data.corrupt_images=ignore"], "'data.corrupt_images'='ignore'"),
    (["{cfg}", "--config.data.mean=1,2,3", "--config.data.std=1"], "'data.std'"),
    (["{cfg}", "--config.data.std=0,1"], "'data.std'"),
    (["{cfg}", "--config.model.pretrained={tmp}/none.safetensors"], "'model.pretrained'"),
    (["{cfg}", "--config.model.pretrained={cfg_path}"], "'model.pretrained'"),
    # --- data and folders
    (["{cfg}", "--config.data.data_dir={cfg_path}"],
     "'data.data_dir': {cfg_path} is a file, not a directory"),
    (["{cfg}", "--config.data.dataset=image_folder", "--config.data.image_folder={tmp}",
      "--config.data.image_size=8", "--config.data.data_dir={tmp}/d"],
     "'data.image_folder': no images under {tmp}"),
    (["{cfg}", "--config.data.dataset=mnist", "--config.data.manual_dir={tmp}/no_such_dir"],
     "'data.manual_dir': {tmp}/no_such_dir does not exist"),
    (["{cfg}", "--config.data.dataset=mnist", "--config.data.manual_dir={cfg_path}"],
     "'data.manual_dir': {cfg_path} is not a directory"),
    (["{cfg}", "--config.data.dataset=imagenet2012", "--config.data.preprocess=imagenet",
      "--config.data.image_size=32", "--config.data.eval_split=validation",
      "--config.data.crop_padding=0", "--config.data.data_dir={tmp}/d"],
     "which TFDS cannot download; it is not set"),
]


def _fill(argv, data_dir, tmp_path):
  values = dict(cfg=f"--config={DEFAULT_CONFIG}", cfg_path=DEFAULT_CONFIG, data=data_dir,
                tmp=str(tmp_path))
  return [a.format(**values) for a in argv]


@pytest.mark.parametrize("argv,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(argv, expected, data_dir, tmp_path,
                                                           capsys, monkeypatch):
  monkeypatch.chdir(REPO)             # the rows name configs/... relative to the checkout
  (tmp_path / "config.json").write_text("{}")
  argv = _fill(argv, data_dir, tmp_path)
  if argv and argv[0] == f"--config={DEFAULT_CONFIG}" and not any("data_dir" in a
                                                                   for a in argv):
    argv.append(f"--config.data.data_dir={data_dir}")
  if argv and not any(a.startswith("--workdir") for a in argv):
    argv.append(f"--workdir={tmp_path}/w")
  code = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  expected = expected.format(tmp=tmp_path, cfg_path=DEFAULT_CONFIG)
  assert len(err) == 1 and err[0].startswith("resnet_jax: error: ") and expected in err[0], err
  assert not (tmp_path / "w").exists()


def test_the_table_has_at_least_100_cases():
  assert len(CASES) >= 100


def test_bad_input_changes_nothing_in_an_existing_run(data_dir, tmp_path):
  """A finished run's workdir is byte for byte the same after bad reruns into it."""
  workdir = tmp_path / "run"
  base = [f"--config={DEFAULT_CONFIG}", f"--config.data.data_dir={data_dir}",
          "--config.model.name=resnet8", "--config.num_train_steps=4",
          f"--workdir={workdir}"]
  assert run_cli(base).returncode == 0

  def snapshot():
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in workdir.rglob("*") if p.is_file()}

  before = snapshot()
  for extra in (["--config.optimizer.learning_rate=oops"], ["--config.num_epochs=inf"],
                ["--config.model.name=resnet20"], ["--config.seed=1"],
                ["--config.eval_every_epochs=1e-9"], ["--config.data.batch_size=4096"]):
    proc = run_cli(base + extra)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert snapshot() == before


TYPO_CONFIG = """from resnet_jax.config_schema import base_config
def get_config():
  c = base_config()
  c.optimizer.lr = 0.1
  return c
"""
BAD_FILES = {  # file name -> (contents or None for missing, expected text)
    "missing.py": (None, "missing.py not found"),
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


def test_a_changed_config_is_refused_on_resume_unless_allowed_and_then_recorded(data_dir,
                                                                                 tmp_path):
  workdir = tmp_path / "w"
  base = [CFG, f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
          "--config.model.name=resnet8", "--config.num_train_steps=8",
          "--config.schedule.warmup_epochs=0"]
  first = run_cli(base + ["--config.stop_after_steps=3"])
  assert first.returncode == 0, first.stderr[-2000:]
  config_before = (workdir / "config.json").read_text()
  saved_before = sorted(os.listdir(workdir / "checkpoints"))

  changed = run_cli(base + ["--config.optimizer.learning_rate=0.05", "--config.num_epochs=3"])
  assert changed.returncode == 2
  (line,) = changed.stderr.strip().splitlines()
  assert f"differs from the one {workdir}/checkpoints/3 was trained with" in line, line
  assert "optimizer.learning_rate 0.1 -> 0.05" in line and "num_epochs 40.0 -> 3.0" in line
  assert "new --workdir" in line and "--allow_config_change" in line
  assert (workdir / "config.json").read_text() == config_before
  assert sorted(os.listdir(workdir / "checkpoints")) == saved_before and "3" in saved_before

  # Keys that do not change the run never block a resume.
  same_run = run_cli(base + ["--config.stop_after_steps=5", "--config.log_every_steps=1",
                             "--config.eval_every_epochs=5", "--config.data.eval_batch_size=16",
                             "--config.checkpoint.every_steps=2", "--config.lowering=cpu",
                             "--config.checkpoint.keep=5"])
  assert same_run.returncode == 0, same_run.stderr[-2000:]
  assert "resumed from" in same_run.stdout and "config changed" not in same_run.stdout
  assert not (workdir / "config_changes.jsonl").exists()

  allowed = run_cli(base + ["--config.optimizer.learning_rate=0.05", "--allow_config_change"])
  assert allowed.returncode == 0, allowed.stderr[-2000:]
  assert ("config changed at step 5 (--allow_config_change): optimizer.learning_rate "
          "0.1 -> 0.05") in allowed.stdout
  (record,) = [json.loads(l) for l in open(workdir / "config_changes.jsonl")]
  assert record["step"] == 5 and record["changes"] == {"optimizer.learning_rate": [0.1, 0.05]}
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 0.05
