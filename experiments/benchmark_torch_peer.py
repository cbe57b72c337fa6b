"""PyTorch peer of `resnet_jax.benchmark`: the same train step in PyTorch and ours, interleaved.

Runs the PyTorch train step (forward, cross-entropy, backward, SGD step; channels_last; on
CPU eager fp32, on GPU bf16 autocast + torch.compile) of the same model, batch, resolution
and dtype as our jit-compiled step, and our step in the same invocation, then prints
images/s for both and the ratio ours/theirs.

Our side runs in a child process, `OURS_PYTHON -m resnet_jax.benchmark ... --serve`, kept
alive for the whole run: after compiling once it runs the steps it is asked for. Rounds
alternate between PyTorch and ours (one child per --lowering), so both see the same load
on a shared machine; the table reports per-step medians over all rounds. Only one side
computes at any moment. The interpreter running this script needs torch (and numpy), not
jax; OURS_PYTHON needs jax (default: this interpreter).

Models: torchvision's when it imports; otherwise definitions below that are exactly
torchvision's architecture (parameter counts asserted: resnet18 11,689,512, resnet50
25,557,032 at 1000 classes). resnet20/32/44/56/110 are He et al.'s CIFAR nets with option-A
(zero-padded identity) shortcuts (resnet20: 269,722 parameters at 10 classes, as ours).

Usage (from the repository root):

  # CPU, this repository's three targets (docs/performance.md); T: a python with torch,
  # e.g. the one ./launch.sh test makes, ~/.cache/resnet_jax/torch-env-*/bin/python
  $T experiments/benchmark_torch_peer.py --model resnet18 \\
      --image-size 224 --batch 32 --ours-python .venv/bin/python
  $T experiments/benchmark_torch_peer.py --model resnet50 \\
      --image-size 224 --batch 32 --ours-python .venv/bin/python
  $T experiments/benchmark_torch_peer.py --model resnet20 \\
      --image-size 32 --batch 128 --ours-python .venv/bin/python
  # one GPU (bf16 autocast + torch.compile for PyTorch, bf16 for ours):
  python experiments/benchmark_torch_peer.py --device cuda --dtype bfloat16 \\
      --model resnet50 --image-size 224 --batch 256

Options: --lowering auto,native (our lowerings to run, comma-separated; each is one row),
--rounds R --steps N (timed steps per side per round) --warmup W, --threads T (PyTorch
intra-op threads; default: PyTorch's own default), --json FILE (everything measured),
--torch-allocator ours|glibc (default ours: this process restarts itself once with our
malloc setup, huge pages and big-buffer reuse, so both sides allocate alike; PyTorch's CPU
step gains from it too, ~7% for ResNet-18; glibc: PyTorch runs on the allocator as launched).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torchvision's counts (1000 classes) and ours for the CIFAR net (10 classes).
EXPECTED_PARAMS = {("resnet18", 1000): 11_689_512, ("resnet50", 1000): 25_557_032,
                   ("resnet20", 10): 269_722}
IMAGENET_LAYERS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                   "resnet50": ("bottleneck", (3, 4, 6, 3)),
                   "resnet101": ("bottleneck", (3, 4, 23, 3)),
                   "resnet152": ("bottleneck", (3, 8, 36, 3))}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


# ---------------------------------------------------------------------------------------
# torchvision's ResNet (v1.5: stride in the bottleneck's 3x3), for when torchvision is absent.

class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ImageNetResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------
# He et al. 2015 CIFAR ResNet (6n+2 layers, 16/32/64 filters, option-A shortcuts).

class ZeroPadShortcut(nn.Module):
  """Subsample by 2 and zero-pad the new channels on both sides (option A)."""

  def __init__(self, extra):
    super().__init__()
    self.extra = extra

  def forward(self, x):
    x = x[:, :, ::2, ::2]
    return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarBlock(nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = (ZeroPadShortcut(planes - inplanes)
                     if stride != 1 or inplanes != planes else nn.Identity())

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
  def __init__(self, depth, num_classes=10):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    blocks, inplanes = [], 16
    for stage, planes in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(CifarBlock(inplanes, planes, 2 if stage > 0 and i == 0 else 1))
        inplanes = planes
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn1(self.conv1(x))))
    return self.fc(x.mean(dim=(2, 3)))


def create_model(name: str, num_classes: int):
  """(model, where its definition came from)."""
  if name in IMAGENET_LAYERS:
    try:
      import torchvision
      return torchvision.models.__dict__[name](num_classes=num_classes), "torchvision"
    except Exception:  # absent, or a build that does not load (e.g. CUDA wheel on CPU)
      block, layers = IMAGENET_LAYERS[name]
      block = BasicBlock if block == "basic" else Bottleneck
      return ImageNetResNet(block, layers, num_classes), "torchvision's architecture, local"
  depth = int(name.replace("resnet", "")) if name.startswith("resnet") else 0
  if depth in CIFAR_DEPTHS:
    return CifarResNet(depth, num_classes), "He et al. CIFAR, option A"
  raise SystemExit(f"benchmark_torch_peer: unknown model {name!r}")


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# The PyTorch side.

class TorchStep:
  """One training step on fixed, device-resident uint8 images, as our synthetic mode."""

  def __init__(self, args):
    self.device = torch.device(args.device)
    self.bf16 = args.dtype == "bfloat16"
    model, self.source = create_model(args.model, args.num_classes)
    self.params = count_params(model)
    expected = EXPECTED_PARAMS.get((args.model, args.num_classes))
    assert expected is None or self.params == expected, (args.model, self.params, expected)
    self.model = model.to(self.device, memory_format=torch.channels_last).train()
    # Ours: SGD momentum 0.9, L2 (coupled, 1e-4) on conv/dense kernels only.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    self.opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                                {"params": no_decay, "weight_decay": 0.0}],
                               lr=0.1, momentum=0.9)
    self.forward = torch.compile(self.model) if self.device.type == "cuda" else self.model
    rng = np.random.RandomState(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    images = torch.from_numpy(rng.randint(0, 256, shape).astype(np.uint8))
    # NHWC in memory = channels_last NCHW.
    self.images = images.permute(0, 3, 1, 2).to(self.device)
    self.labels = torch.from_numpy(rng.randint(0, args.num_classes, args.batch)).to(
        self.device)

  def _step(self):
    x = (self.images.float() - 127.5) / 64.0          # normalised on device, as ours
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.forward(x)
    loss = F.cross_entropy(logits.float(), self.labels)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def _sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def run(self, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self._step()
      self._sync()
      times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------
# Our side: a `resnet_jax.benchmark --serve` child per lowering.

class OursStep:
  def __init__(self, args, lowering: str):
    self.lowering = lowering
    cmd = [args.ours_python, "-m", "resnet_jax.benchmark", "--model", args.model,
           "--image-size", str(args.image_size), "--num-classes", str(args.num_classes),
           "--batch-per-device", str(args.batch), "--devices", "1", "--dtype", args.dtype,
           "--lowering", lowering, "--warmup", str(args.warmup), "--serve"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
      env.setdefault("JAX_PLATFORMS", "cpu")
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    ready = self._reply()
    self.compile_s, self.flops = ready["compile_s"], ready["flops_per_step"]

  def _reply(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"benchmark_torch_peer: our benchmark (lowering {self.lowering}) exited "
                       f"with {self.proc.wait()}; its errors are above")
    return json.loads(line)

  def run(self, steps: int) -> list[float]:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return self._reply()["step_s"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet20")
  p.add_argument("--image-size", type=int, default=0, help="default: 32 CIFAR, 224 ImageNet")
  p.add_argument("--num-classes", type=int, default=0, help="default: 10 CIFAR, 1000 ImageNet")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--device", default="cpu", help="cpu | cuda")
  p.add_argument("--lowering", default="auto,native",
                 help="our lowerings to measure, comma-separated (auto|native|onednn|cpu)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: its default)")
  p.add_argument("--ours-python", default=sys.executable,
                 help="interpreter with jax for our side (default: this one)")
  p.add_argument("--json", default="", help="write everything measured to this file")
  p.add_argument("--torch-allocator", default="ours", choices=("ours", "glibc"),
                 help="ours: PyTorch's process gets the same malloc setup as ours (huge "
                 "pages, big-buffer reuse: resnet_jax/cpu_speed/allocator.py); glibc: as launched")
  args = p.parse_args(argv)
  cifar = args.model not in IMAGENET_LAYERS
  args.image_size = args.image_size or (32 if cifar else 224)
  args.num_classes = args.num_classes or (10 if cifar else 1000)
  return args


def _summary(name, times, batch, flops):
  step = float(np.median(times))
  return dict(name=name, step_s=step, step_ms=round(step * 1e3, 2),
              images_per_s=round(batch / step, 1),
              tflops=round(flops / step / 1e12, 4) if flops else None,
              step_ms_all=[round(t * 1e3, 2) for t in times])


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, REPO)
  from resnet_jax.cpu_speed import allocator   # standard library only: no jax needed here
  if args.torch_allocator == "ours" and args.device == "cpu" and argv is None:
    # Both sides allocate alike (our child inherits it); never on a GPU run.
    allocator.reexec_if_missing()
  if args.threads:
    torch.set_num_threads(args.threads)
  theirs = TorchStep(args)
  theirs.run(args.warmup)
  ours = [OursStep(args, impl) for impl in args.lowering.split(",")]
  times = {"torch": []} | {o.lowering: [] for o in ours}
  try:
    for _ in range(args.rounds):
      times["torch"] += theirs.run(args.steps)
      for o in ours:
        times[o.lowering] += o.run(args.steps)
  finally:
    for o in ours:
      o.close()
  flops = next((o.flops for o in ours if o.flops), None)   # same model, same work
  rows = [_summary(f"ours (lowering {o.lowering})", times[o.lowering], args.batch, o.flops)
          for o in ours]
  torch_row = _summary(f"torch {torch.__version__} ({'compile' if args.device != 'cpu' else 'eager'})",
                       times["torch"], args.batch, flops)
  for row in rows:   # from the medians themselves (images/s are rounded to 0.1)
    row["ours_over_torch"] = round(torch_row["step_s"] / row["step_s"], 3)
  print(f"{args.model} {args.image_size}x{args.image_size} batch {args.batch} {args.dtype} on "
        f"{args.device}; torch model: {theirs.source}, {theirs.params:,} params, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps, "
        f"medians; load average {os.getloadavg()[0]:.1f} at the end; torch's "
        f"{allocator.describe()} (ours: see its own header)")
  print(f"{'':28} {'step ms':>9} {'images/s':>9} {'TFLOP/s':>8} {'ours/torch':>10}")
  for row in rows + [torch_row]:
    ratio = f"{row['ours_over_torch']:.2f}x" if "ours_over_torch" in row else ""
    tflops = f"{row['tflops']:.3f}" if row["tflops"] else "n/a"
    print(f"{row['name']:28} {row['step_ms']:>9.1f} {row['images_per_s']:>9.1f} "
          f"{tflops:>8} {ratio:>10}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(vars(args), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                     torch_model=theirs.source, params=theirs.params,
                     torch_malloc=allocator.describe(),
                     compile_s={o.lowering: o.compile_s for o in ours},
                     rows=rows + [torch_row]), f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
