"""The benchmark harness `python -m resnet_jax.benchmark`: its JSON, FLOPs and MFU, the
end-to-end mode, the --serve protocol of experiments/benchmark_torch_peer.py, bad input.

Every run is a child process (the harness sets --xla_force_host_platform_device_count
itself before jax starts) on tiny workloads: resnet8 on 8x8 images, 2 timed steps.
"""

import json
import os
import statistics
import subprocess
import sys
import threading

import pytest

from conftest import DEFAULT_CONFIG, REPO

TINY = ["--model", "resnet8", "--image-size", "8", "--batch-per-device", "2",
        "--steps", "2", "--warmup", "1"]


def _auto_cpu_impl() -> str:
  """What "auto" means on this machine's CPU backend (the child resolves it the same way)."""
  from resnet_jax import lowering
  return lowering.choose("auto").name
STEP_MS_ROUNDING = 0.005   # step_ms is rounded to 2 decimals


def _env(**extra) -> dict:
  """The child's environment: CPU backend, and no XLA_FLAGS of ours (the harness sets the
  fake-device count itself) unless a test passes one."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **extra)
  return env


def _cmd(*args):
  return [sys.executable, "-m", "resnet_jax.benchmark", *args]


def bench(*args, timeout=300, **env_extra):
  return subprocess.run(_cmd(*args), cwd=REPO, env=_env(**env_extra), capture_output=True,
                        text=True, timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc


def _step_s_bounds(row):
  """(shortest, longest) step in seconds that the rounded step_ms can stand for."""
  return ((row["step_ms"] - STEP_MS_ROUNDING) / 1e3, (row["step_ms"] + STEP_MS_ROUNDING) / 1e3)


def _close_to(value, lo, hi, *, rel=1e-3):
  """`value` lies in [lo, hi] widened by the relative rounding of 4 significant figures."""
  return lo * (1 - rel) <= value <= hi * (1 + rel)


def _check_rows(result, counts, batch_per_device):
  rows = result["rows"]
  assert [r["devices"] for r in rows] == counts
  assert [r["global_batch"] for r in rows] == [n * batch_per_device for n in counts]
  for r in rows:
    assert r["compile_s"] > 0 and r["step_ms"] > 0, r
    assert len(r["step_ms_all"]) == result["steps"] and all(t > 0 for t in r["step_ms_all"])
    assert abs(r["step_ms"] - statistics.median(r["step_ms_all"])) <= 2 * STEP_MS_ROUNDING, r
    # images/s is the global batch over the (unrounded) median step, to 0.1.
    fast, slow = _step_s_bounds(r)
    assert (r["global_batch"] / slow - 0.05 <= r["images_per_s"]
            <= r["global_batch"] / fast + 0.05), r
    assert r["flops_per_step"] > 0, r
    # achieved TFLOP/s = FLOPs of the step (all devices) / median step.
    assert r["achieved_tflops"] > 0 and _close_to(
        r["achieved_tflops"], r["flops_per_step"] / slow / 1e12,
        r["flops_per_step"] / fast / 1e12), r
    assert r["mfu"] > 0, r
    assert r["peak_memory_bytes"] > 0, r
  assert result["peak_memory_bytes"] >= max(r["peak_memory_bytes"] for r in rows)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
  """lowering auto, the measured CPU peak, 2 devices, JSON to a file: (process, results).

  (One device count per run keeps this file fast; test_input_pipeline.py runs 1,2.)"""
  out = tmp_path_factory.mktemp("bench") / "auto.json"
  proc = _ok(bench(*TINY, "--devices", "2", f"--json={out}"))
  with open(out) as f:
    return proc, json.load(f)


@pytest.fixture(scope="module")
def native_run():
  """lowering native, --peak-tflops, 2 devices only, JSON on stdout: (process, results)."""
  proc = _ok(bench(*TINY, "--devices", "2", "--lowering", "native", "--peak-tflops",
                   "0.01", "--json"))
  return proc, json.loads(proc.stdout)   # stdout is nothing but the JSON


def test_json_file_has_the_workload_and_a_full_row_per_device_count(auto_run):
  proc, result = auto_run
  assert result["model"] == "resnet8" and result["image_shape"] == [8, 8, 3]
  assert result["num_classes"] == 10 and result["mode"] == "synthetic"
  assert result["lowering"] == "auto" and result["lowering_resolved"] == _auto_cpu_impl()
  assert result["backend"] == "cpu" and result["dtype"] == "float32"
  assert "--xla_force_host_platform_device_count=2" in result["xla_flags"]
  _check_rows(result, [2], 2)
  # No --peak-tflops on CPU: the peak is a 4096^3 matmul timed in the same run, and it is
  # the whole host's (the fake devices share it), so MFU does not multiply it by n.
  assert result["peak_flops_source"].startswith("measured float32 4096^3 matmul")
  assert result["peak_flops_is_whole_host"] is True and result["peak_flops"] > 1e9
  for r in result["rows"]:
    fast, slow = _step_s_bounds(r)
    peak = result["peak_flops"]
    assert _close_to(r["mfu"], r["flops_per_step"] / slow / peak,
                     r["flops_per_step"] / fast / peak), r
  # With --json=FILE the human-readable table is on stdout.
  assert "global batch" in proc.stdout and "resnet8 8x8x3 float32" in proc.stdout
  assert f"lowering auto (-> {_auto_cpu_impl()})" in proc.stdout


def test_json_alone_prints_pure_json_on_stdout_and_the_table_on_stderr(native_run):
  proc, result = native_run
  assert proc.stdout.lstrip().startswith("{") and proc.stdout.rstrip().endswith("}")
  assert "global batch" not in proc.stdout and "global batch" in proc.stderr
  assert "lowering native (-> native)" in proc.stderr
  assert result["json"] == "-"
  assert result["lowering"] == "native" and result["lowering_resolved"] == "native"
  assert result["model"] == "resnet8" and result["image_shape"] == [8, 8, 3]
  assert result["backend"] == "cpu"
  _check_rows(result, [2], 2)


def test_peak_tflops_is_the_per_device_peak_of_the_mfu(native_run):
  _, result = native_run
  assert result["peak_flops"] == pytest.approx(0.01e12)
  assert result["peak_flops_source"] == "--peak-tflops"
  assert result["peak_flops_is_whole_host"] is False
  for r in result["rows"]:   # a given peak is per device: n devices have n times it
    fast, slow = _step_s_bounds(r)
    peak = 0.01e12 * r["devices"]
    assert _close_to(r["mfu"], r["flops_per_step"] / slow / peak,
                     r["flops_per_step"] / fast / peak), r
    assert _close_to(r["mfu"], r["achieved_tflops"] / (0.01 * r["devices"]),
                     r["achieved_tflops"] / (0.01 * r["devices"]), rel=2e-3), r


def test_step_flops_are_about_three_forward_passes_for_either_conv_lowering(auto_run,
                                                                              native_run):
  from resnet_jax import models
  from resnet_jax.models import flops
  fwd_macs = flops.xla_macs(models.create("resnet8", num_classes=10), 8, 3)
  assert fwd_macs > 0
  cpu_rows, native_rows = auto_run[1]["rows"], native_run[1]["rows"]
  for r in cpu_rows + native_rows:
    # forward + backward (about twice the forward) over the global batch, plus the
    # optimizer and loss: about 3 forward passes of 2 FLOPs per MAC.
    ratio = r["flops_per_step"] / (2 * fwd_macs * r["global_batch"])
    assert 2.0 <= ratio <= 4.5, (ratio, r)
  # The same work (2 devices, global batch 4) lowered two ways.
  (cpu_row,), (native_row,) = cpu_rows, native_rows
  assert cpu_row["global_batch"] == native_row["global_batch"] == 4
  assert cpu_row["flops_per_step"] == pytest.approx(native_row["flops_per_step"], rel=0.1)


def test_end_to_end_mode_runs_the_config_input_pipeline_with_overrides(tmp_path):
  data_dir = tmp_path / "tfds"
  out = tmp_path / "e2e.json"
  _ok(bench("--mode", "end_to_end", "--config", DEFAULT_CONFIG, "--model", "resnet8",
            "--batch-per-device", "8", "--devices", "1", "--steps", "2", "--warmup", "1",
            "--peak-tflops", "1", f"--config.data.data_dir={data_dir}", f"--json={out}"))
  result = json.loads(out.read_text())
  assert result["mode"] == "end_to_end" and result["config"] == DEFAULT_CONFIG
  # Shape and classes are the dataset's (8x8 grey digits), not the synthetic defaults.
  assert result["image_shape"] == [8, 8, 1] and result["num_classes"] == 10
  assert result["model"] == "resnet8"   # --model over the config's resnet20
  assert result["lowering_resolved"] == _auto_cpu_impl()
  _check_rows(result, [1], 8)
  # The override took effect: the dataset was prepared where it said.
  assert (data_dir / "sklearn_digits").is_dir(), sorted(os.listdir(tmp_path))


def test_a_config_gives_the_trainers_model_and_step():
  """With --config the benchmark times what the trainer would train: its model (drop path,
  BN momentum, dtype from the config) and its step (label smoothing, accumulation, EMA)."""
  import jax
  from resnet_jax import benchmark, config_cli, lowering
  from resnet_jax.training import mesh as mesh_lib, setup
  overrides = ["--config.model.drop_path_rate=0.1", "--config.model.bn_momentum=0.8",
               "--config.optimizer.label_smoothing=0.1", "--config.optimizer.ema_decay=0.5",
               "--config.optimizer.grad_accum_steps=2"]
  args = benchmark._parse(["--config", DEFAULT_CONFIG, "--model", "resnet8", "--image-size",
                           "8", "--channels", "1", "--batch-per-device", "4", *overrides])
  work = benchmark._Workload(args)
  config, _ = config_cli.resolve(DEFAULT_CONFIG, args.config_overrides)
  assert len(args.config_overrides) == len(overrides)
  mesh = mesh_lib.create_mesh(devices=jax.devices()[:1])
  chosen = lowering.choose("auto")
  model = work.setup(mesh, chosen).model
  assert model == setup.create_model(config.model, 10, chosen, name="resnet8")
  assert model.drop_path_rate == 0.1 and args.dtype == config.model.dtype

  batches = work.batches(mesh, 4)
  state, compiled, _, _ = benchmark._compile_step(work, mesh, chosen, next(batches))
  # The EMA is part of the step: its BN statistics move on the first step already (the
  # parameters' may not: the schedule can start at learning rate 0).
  before = jax.tree.map(lambda a: a.copy(), state.ema_batch_stats)
  state, _ = compiled(state, next(batches))
  moved = jax.tree.map(lambda a, b: bool((a != b).any()), before, state.ema_batch_stats)
  assert state.ema_params and all(jax.tree.leaves(moved))


def test_a_bad_config_override_is_a_one_line_error():
  proc = bench("--mode", "end_to_end", "--config", DEFAULT_CONFIG, "--model", "resnet8",
               "--devices", "1", "--peak-tflops", "1", "--config.data.crop_paddin=2")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      "benchmark: error: unknown config key 'data.crop_paddin' "
      "(did you mean 'data.crop_padding'?)"], proc.stderr[-3000:]
  assert proc.stdout == ""


class _Server:
  """A `--serve` child; killed if a reply takes longer than `timeout` seconds."""

  def __init__(self, args, stderr, timeout=240):
    self.proc = subprocess.Popen(_cmd(*args), cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
    self.watchdog = threading.Timer(timeout, self.proc.kill)
    self.watchdog.start()

  def reply(self) -> dict:
    line = self.proc.stdout.readline()
    assert line, f"no reply; exit {self.proc.poll()}"
    return json.loads(line)

  def send(self, text):
    self.proc.stdin.write(text)
    self.proc.stdin.flush()

  def finish(self) -> tuple[int, str]:
    self.proc.stdin.close()
    rest = self.proc.stdout.read()
    code = self.proc.wait(timeout=60)
    self.watchdog.cancel()
    return code, rest

  def kill(self):
    self.watchdog.cancel()
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def test_serve_answers_each_step_count_with_step_times_until_eof(tmp_path):
  err_path = tmp_path / "stderr.txt"
  with open(err_path, "w") as err:
    server = _Server([*TINY, "--devices", "1", "--peak-tflops", "1", "--serve"], err)
    try:
      ready = server.reply()
      assert ready["ready"] is True and ready["compile_s"] > 0 and ready["flops_per_step"] > 0
      server.send("2\n")
      first = server.reply()
      assert len(first["step_s"]) == 2 and all(t > 0 for t in first["step_s"]), first
      server.send("\n1\n")   # blank lines are skipped
      second = server.reply()
      assert len(second["step_s"]) == 1 and second["step_s"][0] > 0, second
      code, rest = server.finish()
    finally:
      server.kill()
  assert code == 0, err_path.read_text()[-3000:]
  assert rest == ""   # nothing after the replies: no results JSON, the table went to stderr
  assert "global batch" in err_path.read_text()


@pytest.mark.parametrize("args,env_extra,message", [
    (["--devices", "64"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     "benchmark: error: --devices asks for 64, 2 available"),
    (["--serve", "--devices", "1,2"], {},
     "benchmark: error: --serve takes one device count"),
    (["--model", "resnet7"], {},
     "benchmark: error: unknown model 'resnet7'; known: "),
    (["--config", DEFAULT_CONFIG, "--config.optimizer.grad_accum_steps=4"], {},
     "benchmark: error: --batch-per-device 2: expected a multiple of the config's "
     "optimizer.grad_accum_steps=4"),
], ids=["more-devices-than-available", "serve-several-counts", "unknown-model",
        "batch-not-split-by-accumulation"])
def test_requests_the_machine_cannot_serve_are_one_line_errors(args, env_extra, message):
  proc = bench(*TINY, "--peak-tflops", "1", *args, **env_extra)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-3000:]
  assert proc.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["--mode", "end_to_end"], "--mode end_to_end needs --config FILE"),
    (["--devices", "1,x"], "--devices: expected comma-separated positive counts"),
    (["--devices", "0"], "--devices: expected comma-separated positive counts"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-per-device", "0"], "--batch-per-device must be >= 1"),
    (["--no-such-flag"], "unrecognized argument --no-such-flag"),
    (["--lowering", "fast"], "argument --lowering: invalid choice: 'fast'"),
])
def test_bad_arguments_are_usage_errors(args, message):
  proc = bench(*args, timeout=60)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.startswith("usage: ") and "Traceback" not in proc.stderr, proc.stderr
  assert f"error: {message}" in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.skipif(not os.environ.get("RESNET_JAX_TORCH_PYTHON"),
                    reason="no PyTorch interpreter (./launch.sh test sets one up)")
def test_torch_peer_compares_both_lowerings_with_pytorch(tmp_path):
  out = tmp_path / "peer.json"
  proc = subprocess.run(
      [os.environ["RESNET_JAX_TORCH_PYTHON"],
       os.path.join(REPO, "experiments", "benchmark_torch_peer.py"),
       "--model", "resnet20", "--image-size", "32", "--batch", "8", "--rounds", "1",
       "--steps", "1", "--warmup", "1", "--lowering", "auto,native",
       "--ours-python", sys.executable, "--json", str(out)],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["params"] == 269_722   # the PyTorch net is ours, parameter for parameter
  assert set(result["compile_s"]) == {"auto", "native"}
  assert all(v > 0 for v in result["compile_s"].values())
  rows = {r["name"]: r for r in result["rows"]}
  ours = [rows.pop("ours (lowering auto)"), rows.pop("ours (lowering native)")]
  (torch_name, torch_row), = rows.items()
  assert torch_name.startswith("torch ")
  for r in ours + [torch_row]:
    assert r["step_ms"] > 0 and r["images_per_s"] > 0 and r["tflops"] > 0, r
    assert len(r["step_ms_all"]) == 1
  for r in ours:
    assert r["ours_over_torch"] > 0
    assert r["ours_over_torch"] == pytest.approx(torch_row["step_s"] / r["step_s"], abs=1e-3)
  assert "ours_over_torch" not in torch_row
