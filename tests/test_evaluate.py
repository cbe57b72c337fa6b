"""`python -m resnet_jax.evaluate WORKDIR`: a finished run evaluated from its workdir alone
gives exactly the metrics its own final evaluation logged, in a file of its own, and
touches nothing else in the workdir; overrides that would change the run are refused."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from resnet_jax import evaluate

from conftest import REPO, cli_env, copy_without_ema, read_metrics
from test_run_to_weights import STEPS, digits_run  # noqa: F401  (the session's run)


def _snapshot(workdir):
  """{relative path: (size, mtime_ns, sha256)} of every file under `workdir`."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      stat = os.stat(path)
      out[os.path.relpath(path, workdir)] = (stat.st_size, stat.st_mtime_ns, digest)
  return out


def _logged(workdir, split, step):
  row, = [r for r in read_metrics(workdir, split) if r["step"] == step]
  return {k: v for k, v in row.items() if k not in ("step", "split")}


def _evaluate(capsys, *argv):
  code = evaluate.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out.strip(), captured.err.strip()


def test_evaluate_matches_the_runs_final_eval_and_touches_nothing(digits_run, capsys):
  before = _snapshot(digits_run)
  assert "results.json" in before and any(p.startswith("checkpoints/") for p in before)
  # The command itself, in a fresh process.
  proc = subprocess.run([sys.executable, "-m", "resnet_jax.evaluate", digits_run], cwd=REPO,
                        env=cli_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  raw_file = os.path.join(digits_run, f"eval_test_step{STEPS}.json")
  logged = _logged(digits_run, "eval", STEPS)
  assert proc.stdout.strip() == (
      f"{digits_run} step {STEPS} (raw weights), split test: top1={logged['top1']:.4f} "
      f"top5={logged['top5']:.4f} loss={logged['loss']:.4f} (359 examples); wrote {raw_file}")
  with open(raw_file) as f:
    written = json.load(f)
  assert {k: written[k] for k in logged} == logged        # exactly, not approximately
  assert written["step"] == STEPS and written["split"] == "test" and not written["ema"]
  assert written["checkpoint"] == os.path.join(digits_run, "checkpoints", str(STEPS))
  # The EMA weights: the run's eval_ema line (here in this process, as the run was).
  code, out, err = _evaluate(capsys, digits_run, "--ema", "--step", str(STEPS))
  assert code == 0, err
  ema_file = os.path.join(digits_run, f"eval_test_step{STEPS}_ema.json")
  with open(ema_file) as f:
    written = json.load(f)
  logged_ema = _logged(digits_run, "eval_ema", STEPS)
  assert {k: written[k] for k in logged_ema} == logged_ema and written["ema"]
  assert logged_ema != logged
  # Nothing else written: results.json, metrics, config and checkpoints byte for byte, same
  # modification times.
  after = _snapshot(digits_run)
  new = set(after) - set(before)
  assert new == {os.path.basename(raw_file), os.path.basename(ema_file)}
  assert {p: after[p] for p in before} == before


def test_overrides_that_keep_the_run(digits_run, capsys):
  """Another split and eval batch: allowed (changes_run=False); its own file."""
  code, out, err = _evaluate(capsys, digits_run, "--best", "--split", "train",
                             "--config.data.eval_batch_size=100")
  assert code == 0, err
  path = os.path.join(digits_run, f"eval_train_step{STEPS}.json")
  assert out.endswith(f"(1438 examples); wrote {path}")
  with open(path) as f:
    written = json.load(f)
  assert written["examples"] == 1438 and written["split"] == "train"
  assert written["checkpoint"] == os.path.join(digits_run, "checkpoints_best", str(STEPS))
  assert written["overrides"] == {"data.eval_batch_size": "100", "data.eval_split": "train"}


@pytest.mark.parametrize("argv,message", [
    (["--config.model.name=resnet20"],
     "config key 'model.name' changes the run, which evaluation does not"),
    (["--config.optimizer.learning_rate=1.0"],
     "config key 'optimizer.learning_rate' changes the run"),
    (["--config.data.eval_splitt=train"], "unknown config key 'data.eval_splitt'"),
    (["--step", "5"], "no checkpoint at step 5 in checkpoints/"),
    (["--split", "validation"], "split 'validation' not in dataset sklearn_digits"),
    (["--frobnicate"], "cannot parse argument '--frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(digits_run, argv, message, capsys):
  before = _snapshot(digits_run)
  code, out, err = _evaluate(capsys, digits_run, *argv)
  assert code == 2 and out == "" and "\n" not in err, err
  assert err.startswith("evaluate: error: ") and message in err, err
  assert _snapshot(digits_run) == before


def test_ema_of_a_run_without_ema_and_a_workdir_without_checkpoints(digits_run, tmp_path,
                                                                    capsys):
  no_ema = copy_without_ema(digits_run, tmp_path / "no_ema")
  code, _, err = _evaluate(capsys, no_ema, "--ema")
  assert code == 2 and err == (f"evaluate: error: {no_ema}: --ema, but the run kept no EMA of "
                               "its weights (optimizer.ema_decay=0.0)")
  code, _, err = _evaluate(capsys, str(tmp_path))
  assert code == 2 and err == (f"evaluate: error: {tmp_path}: no checkpoints in checkpoints/ "
                               "(not a training run's workdir, or it has saved nothing yet)")
