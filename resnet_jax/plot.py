"""`python -m resnet_jax.plot WORKDIR [WORKDIR ...] --out FILE.png`: training curves.

Train and test error (%) against iterations for one or several runs, in the style of the
ResNet paper's Fig. 6: one colour per run, thin dashed lines for training error, bold lines
for test error. Training error is 1 - the train accuracy each metrics.jsonl line holds,
which is the mean over the steps since the previous line (log_every_steps), not one batch;
test error is 1 - top1 of every eval. The same series go to FILE.csv (run, split, step,
error_percent), for other plotting tools.

  python -m resnet_jax.plot experiments/runs/cifar10_plain20 experiments/runs/cifar10_plain56 \\
      --out plain.png --title "plain nets" --ymax 20
"""

import argparse
import csv
import json
import os
import sys


def read_series(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{"train": [(step, error %)], "test": [...]} of one run's metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  series: dict[str, list[tuple[int, float]]] = {"train": [], "test": []}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
      if row.get("split") == "train" and "accuracy" in row:
        series["train"].append((row["step"], 100.0 * (1.0 - row["accuracy"])))
      elif row.get("split") == "eval" and "top1" in row:
        series["test"].append((row["step"], 100.0 * (1.0 - row["top1"])))
  return series


def run_label(workdir: str) -> str:
  """The run's model name from its config.json, else the folder's name."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)["model"]["name"]
  except (OSError, KeyError, json.JSONDecodeError):
    return os.path.basename(os.path.normpath(workdir))


def plot(runs: dict[str, dict], out: str, *, title: str = "", ymax: float = 0.0) -> str:
  """Draw `runs` ({label: series}) into `out` (PNG) and write the CSV beside it; returns the
  CSV's path."""
  import matplotlib
  matplotlib.use("Agg")              # files only: no display needed
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (label, series) in enumerate(runs.items()):
    colour = colours[i % len(colours)]
    for split, style in (("train", dict(linewidth=0.8, linestyle="--")),
                         ("test", dict(linewidth=2.2))):
      if series[split]:
        steps, errors = zip(*series[split])
        ax.plot(steps, errors, color=colour, label=f"{label} {split}", **style)
  ax.set_xlabel("iterations")
  ax.set_ylabel("error (%)")
  if ymax > 0:
    ax.set_ylim(0, ymax)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "dashed: training error, bold: test error")
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)
  csv_path = os.path.splitext(out)[0] + ".csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["run", "split", "step", "error_percent"])
    for label, series in runs.items():
      for split in ("train", "test"):
        for step, error in series[split]:
          writer.writerow([label, split, step, f"{error:.4f}"])
  return csv_path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("workdirs", nargs="+", help="run folders holding metrics.jsonl")
  p.add_argument("--out", required=True, help="the PNG to write (the CSV goes beside it)")
  p.add_argument("--title", default="")
  p.add_argument("--ymax", type=float, default=0.0, help="upper limit of the error axis (%%)")
  args = p.parse_args(argv)
  if not args.out.lower().endswith(".png"):
    print(f"plot: error: --out {args.out}: expected a .png file name", file=sys.stderr)
    return 2
  runs = {}
  for workdir in args.workdirs:
    try:
      series = read_series(workdir)
    except OSError as e:
      print(f"plot: error: {workdir}: no metrics.jsonl to read ({e.strerror})",
            file=sys.stderr)
      return 2
    except ValueError as e:
      print(f"plot: error: {e}", file=sys.stderr)
      return 2
    if not series["train"] and not series["test"]:
      print(f"plot: error: {workdir}/metrics.jsonl holds no train or eval lines",
            file=sys.stderr)
      return 2
    label = run_label(workdir)
    runs[label if label not in runs else f"{label} ({workdir})"] = series
  csv_path = plot(runs, args.out, title=args.title, ymax=args.ymax)
  print(f"wrote {args.out} and {csv_path}: {len(runs)} run(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
