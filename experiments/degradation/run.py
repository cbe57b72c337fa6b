"""The degradation experiment of the ResNet paper (He et al. 2015, Fig. 6), one command:
plain-20/56 and ResNet-20/56 on CIFAR-10 with the paper's recipe (configs/cifar10.py), then
the curves, a results table and the layer-by-layer gradient norms at initialisation and at
the end of training.

  python experiments/degradation/run.py                      # the paper's 64k iterations
  python experiments/degradation/run.py --budget 2000 --data jpeg   # compressed (see below)

--budget B compresses the schedule: B iterations, the learning rate divided by 10 at B/2
and 3B/4 (the paper's 32k/48k of 64k). --data tfds (TFDS's CIFAR-10, downloaded on first
use) or jpeg (the JPEG copy: $RESNET_JAX_DATA/cifar10_jpeg, or --image-folder). Each net is
a normal run in --runs/<net> (rerunning the command resumes unfinished ones; finished ones
are kept); everything measured goes to --out: results.md, results.json, plain.png and
resnet.png (the paper's Fig. 6, left and middle) with their CSVs, gradients.png.

The paper's finding to test: plain-56 has a higher *training* error than plain-20
throughout training (the degradation problem), while ResNet-56 ends lower than ResNet-20.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL_SCHEDULE = 64_000
# The paper's test error (%) of these nets, Table 6 (option A) and Fig. 6 (plain: read
# off the figure, not printed as numbers).
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet56": 6.97}


def _python(*args, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=REPO, **kwargs)


def _config_arg(model: str, data: str) -> str:
  return f"--config={os.path.join(REPO, 'configs', 'cifar10.py')}:{model}" + (
      ",jpeg" if data == "jpeg" else "")


def _overrides(args) -> list[str]:
  b = args.budget
  out = [f"--config.num_train_steps={b}",
         f"--config.schedule.decay_steps={b // 2},{3 * b // 4}",
         "--config.log_grad_norms=stage",
         f"--config.log_every_steps={max(b // 100, 1)}",
         # ten evaluations over the run, the last at its end
         f"--config.eval_every_steps={max(b // 10, 1)}",
         f"--config.checkpoint.every_steps={max(b // 4, 1)}"]
  if args.image_folder:
    out.append(f"--config.data.image_folder={os.path.abspath(args.image_folder)}")
  if args.data_dir:
    out.append(f"--config.data.data_dir={os.path.abspath(args.data_dir)}")
  return out


def train(model: str, args) -> dict:
  """Train one net (or resume it); its wall time and results."""
  workdir = os.path.join(args.runs, model)
  results = os.path.join(workdir, "results.json")
  if os.path.isfile(results):
    with open(results) as f:
      done = json.load(f)
    if done.get("step") == args.budget:
      print(f"{model}: already trained ({results})", flush=True)
      return dict(done, wall_seconds=done.get("wall_seconds"))
  print(f"{model}: training {args.budget} steps in {workdir}", flush=True)
  t0 = time.time()
  proc = _python("-m", "resnet_jax", _config_arg(model, args.data), *_overrides(args),
                 f"--workdir={workdir}")
  if proc.returncode != 0:
    raise SystemExit(f"degradation: {model} failed (exit {proc.returncode}); rerun the "
                     "same command to resume it")
  wall = time.time() - t0
  with open(results) as f:
    done = json.load(f)
  done["wall_seconds"] = round(wall, 1)
  with open(results, "w") as f:       # kept with the run, so a rerun reports it
    json.dump(done, f, indent=2)
  return done


def probe(model: str, args, *, trained: bool) -> dict:
  """Per-layer gradient norms at initialisation or of the trained net."""
  workdir = os.path.join(args.runs, model)
  os.makedirs(workdir, exist_ok=True)
  out = os.path.join(workdir, f"gradients_{'trained' if trained else 'init'}.json")
  where = [f"--workdir={workdir}"] if trained else [
      _config_arg(model, args.data), *_overrides(args)]
  proc = _python("-m", "resnet_jax.gradients", *where, f"--batches={args.probe_batches}",
                 f"--json={out}", capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"degradation: the gradient probe of {model} failed: "
                     f"{proc.stderr.strip().splitlines()[-1:]}")
  with open(out) as f:
    return json.load(f)


def _fraction_higher(a: list, b: list) -> tuple[float, int]:
  """Of the train-error points both runs logged, the fraction where a's is above b's."""
  b_at = dict(b)
  pairs = [(err, b_at[step]) for step, err in a if step in b_at]
  return (sum(x > y for x, y in pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def _steady_seconds_per_step(workdir: str) -> float | None:
  """Training time per step without start-up, compilation and evaluations: the median over
  the train lines but the first of batch / images_per_sec (each line's own interval)."""
  import statistics
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [row["images_per_sec"] for row in map(json.loads, f)
             if row.get("split") == "train" and row.get("images_per_sec")]
  with open(os.path.join(workdir, "config.json")) as f:
    batch = json.load(f)["data"]["batch_size"]
  return batch / statistics.median(rates[1:]) if len(rates) > 1 else None


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def report(args, models, results, probes, command) -> None:
  sys.path.insert(0, REPO)
  from resnet_jax import plot as plot_lib
  from resnet_jax import gradients as gradients_lib
  os.makedirs(args.out, exist_ok=True)
  series = {m: plot_lib.read_series(os.path.join(args.runs, m)) for m in models}
  figures = []
  for family in ("plain", "resnet"):
    members = [m for m in models if m.startswith(family)]
    if members:
      path = os.path.join(args.out, f"{family}.png")
      plot_lib.plot({m: series[m] for m in members}, path,
                    title=f"{family} nets on CIFAR-10, {args.budget} iterations "
                          "(dashed: train, bold: test)")
      figures.append(path)
  gradients_lib.plot([probes[m]["init"] for m in models] +
                     [probes[m]["trained"] for m in models],
                     os.path.join(args.out, "gradients.png"))
  rows = []
  for m in models:
    r, train = results[m], series[m]["train"]
    last_train = train[-1][1] if train else float("nan")
    tests = [e for _, e in series[m]["test"]]
    seconds_per_step = _steady_seconds_per_step(os.path.join(args.runs, m))
    rows.append(dict(
        model=m, steps=r["step"], train_error=round(last_train, 2),
        test_error=round(100 * (1 - r["top1"]), 2),
        best_test_error=round(min(tests), 2) if tests else None,
        paper_test_error=PAPER_TEST_ERROR.get(m), wall_seconds=r.get("wall_seconds"),
        seconds_per_step=round(seconds_per_step, 3) if seconds_per_step else None,
        projected_full_hours=round(seconds_per_step * FULL_SCHEDULE / 3600, 1)
        if seconds_per_step else None,
        gradients={k: {x: probes[m][k][x] for x in ("first_norm", "last_conv_norm",
                                                    "head_norm", "first_to_last_ratio")}
                   for k in ("init", "trained")}))
  checks = {}
  for deep, shallow in (("plain56", "plain20"), ("resnet56", "resnet20")):
    if deep in series and shallow in series:
      frac, n = _fraction_higher(series[deep]["train"], series[shallow]["train"])
      checks[f"{deep}_train_error_above_{shallow}"] = {"fraction_of_points": round(frac, 3),
                                                       "points": n}
  machine = _machine()
  summary = dict(command=command, budget=args.budget, data=args.data,
                 decay_steps=[args.budget // 2, 3 * args.budget // 4], machine=machine,
                 date=datetime.date.today().isoformat(), rows=rows, checks=checks)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _write_markdown(args, summary)


def _write_markdown(args, s) -> None:
  lines = [f"# Degradation experiment: {args.budget} iterations", "",
           f"Command: `{s['command']}`  ", f"Machine: {s['machine']}; {s['date']}  ",
           f"Data: {'TFDS CIFAR-10' if s['data'] == 'tfds' else 'the JPEG copy of CIFAR-10'}"
           f"; learning rate 0.1, /10 at steps {s['decay_steps'][0]} and "
           f"{s['decay_steps'][1]} (the paper: 32k, 48k of 64k)", "",
           "| net | train error % (last interval) | test error % (final) | best test % | "
           "paper test % (64k) | wall time | s/step (steady) | 64k steps at that rate |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    wall = f"{r['wall_seconds'] / 60:.1f} min" if r["wall_seconds"] else "n/a"
    lines.append(f"| {r['model']} | {r['train_error']} | {r['test_error']} | "
                 f"{r['best_test_error']} | {r['paper_test_error'] or '-'} | {wall} | "
                 f"{r['seconds_per_step'] or 'n/a'} | "
                 f"{str(r['projected_full_hours']) + ' h' if r['projected_full_hours'] else 'n/a'} |")
  lines += ["", "Gradient norms (probe: `python -m resnet_jax.gradients`, "
            f"{args.probe_batches} training batches):", "",
            "| net | stem, init | last conv, init | stem / last conv, init | "
            "stem, trained | last conv, trained | stem / last conv, trained |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    g0, g1 = r["gradients"]["init"], r["gradients"]["trained"]
    lines.append(f"| {r['model']} | {g0['first_norm']:.3g} | {g0['last_conv_norm']:.3g} | "
                 f"{g0['first_to_last_ratio']:.3g} | {g1['first_norm']:.3g} | "
                 f"{g1['last_conv_norm']:.3g} | {g1['first_to_last_ratio']:.3g} |")
  if s["checks"]:
    lines += ["", "Training-error comparisons over every logged point (interval means):", ""]
    for name, c in s["checks"].items():
      lines.append(f"- {name.replace('_', ' ')}: at {100 * c['fraction_of_points']:.0f}% "
                   f"of {c['points']} points")
  lines += ["", "Wall time: the whole run (start-up, compilation, the ten evaluations); s/step: "
            "the median interval between train lines after the first."]
  lines += ["", "Figures: plain.png, resnet.png (dashed: training error, bold: test error), "
            "gradients.png (norm per layer, init and trained); the curves' data in the CSVs."]
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("--budget", type=int, default=FULL_SCHEDULE, help="iterations per net")
  p.add_argument("--models", default="plain20,plain56,resnet20,resnet56")
  p.add_argument("--data", default="tfds", choices=("tfds", "jpeg"))
  p.add_argument("--image-folder", default="", help="--data jpeg: the CIFAR-10 JPEG folder")
  p.add_argument("--data-dir", default="", help="TFDS data_dir for the prepared dataset")
  p.add_argument("--runs", default="", help="workdirs (default experiments/runs/degradation_B)")
  p.add_argument("--out", default="", help="results (default experiments/degradation/B)")
  p.add_argument("--probe-batches", type=int, default=4)
  args = p.parse_args(argv)
  if args.budget < 4:
    p.error(f"--budget {args.budget}: expected at least 4 iterations")
  models = [m for m in args.models.split(",") if m]
  args.runs = args.runs or os.path.join(REPO, "experiments", "runs",
                                        f"degradation_{args.budget}")
  args.out = args.out or os.path.join(REPO, "experiments", "degradation", str(args.budget))
  command = "python experiments/degradation/run.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  results, probes = {}, {}
  for m in models:
    probes[m] = {"init": probe(m, args, trained=False)}
    results[m] = train(m, args)
    probes[m]["trained"] = probe(m, args, trained=True)
  report(args, models, results, probes, command)
  print(f"wrote {args.out}/results.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
