"""`python -m resnet_jax.gradients`: the gradient norm of every layer, in depth order.

For each conv and dense kernel, from the stem to the classifier, the L2 norm of the
gradient of the training loss (the config's: label smoothing included, weight decay not) on
real training batches, BatchNorm in training mode, as a train step computes it. Averaged
over --batches batches (their standard deviation reported too). At initialisation, or from
a run's checkpoint:

  python -m resnet_jax.gradients --model plain56 --config configs/cifar10.py:plain56
  python -m resnet_jax.gradients --workdir experiments/runs/cifar10_resnet56 --json g.json
  python -m resnet_jax.gradients --model resnet20 --plot resnet20.png     # the digits

--config defaults to the default experiment (configs/digits_resnet20.py: real data,
offline); --model overrides its model. With --workdir the run's recorded config.json and
its latest checkpoint (or --step) are used. Summary: the stem's norm, the last conv's, and
their ratio first / last -- how much larger (> 1) or smaller (< 1) the gradient is at the
bottom of the network than at its top.
"""

import argparse
import json
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "digits_resnet20.py")


def layer_order(model, image_shape) -> list[tuple[str, ...]]:
  """The parameter paths of the model's conv and dense layers in the order the forward pass
  calls them (any block type: recorded, not parsed from names)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
      order.append(tuple(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return list(dict.fromkeys(order))


def layer_gradient_norms(run, variables, batches) -> dict:
  """{"layers": [(path, [norm per batch])]} of the loss gradient for every conv/dense
  kernel of `run.model` (a setup.Run) on `batches` (host dicts of image/label)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import traverse_util
  from resnet_jax.training import steps
  inputs, config = run.inputs, run.config
  order = layer_order(run.model, inputs.image_shape)

  def kernel_norms(params, batch_stats, images, labels):
    def loss_fn(params):
      logits, _ = run.model.apply({"params": params, "batch_stats": batch_stats},
                                  steps.normalize(images, inputs.mean, inputs.std),
                                  train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.PRNGKey(0)})
      targets = optax.smooth_labels(jax.nn.one_hot(labels, inputs.num_classes),
                                    config.optimizer.label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean()
    grads = traverse_util.flatten_dict(jax.grad(loss_fn)(params))
    return [jnp.sqrt(jnp.sum(jnp.square(grads[path + ("kernel",)]))) for path in order]

  norms = run.lowering.jit(kernel_norms)
  per_batch = [jax.device_get(norms(variables["params"], variables["batch_stats"],
                                    batch["image"], batch["label"])) for batch in batches]
  return {"layers": [("/".join(path), [float(b[i]) for b in per_batch])
                     for i, path in enumerate(order)]}


def summarise(layers) -> dict:
  """Means and spreads per layer; the stem, the last conv, the head and the ratio."""
  import numpy as np
  rows = [{"depth": i, "layer": name, "norm": float(np.mean(values)),
           "std": float(np.std(values))} for i, (name, values) in enumerate(layers)]
  convs = [r for r in rows if not r["layer"].startswith("head")]
  first, last = convs[0], convs[-1]
  head = next((r for r in rows if r["layer"].startswith("head")), None)
  return {"layers": rows, "first_layer": first["layer"], "first_norm": first["norm"],
          "last_conv": last["layer"], "last_conv_norm": last["norm"],
          "head_norm": head["norm"] if head else None,
          "first_to_last_ratio": first["norm"] / last["norm"] if last["norm"] else None}


def probe(config, *, batches: int = 4, workdir: str = "", step: int | None = None) -> dict:
  """Per-layer gradient norms of `config`'s model on its first `batches` training batches:
  at initialisation, or from `workdir`'s checkpoint at `step` (default: the latest)."""
  import itertools
  import jax
  from resnet_jax.data import input_pipeline
  from resnet_jax.errors import ConfigError
  from resnet_jax.training import checkpoints, setup
  data = setup.prepare_data(config)
  run = setup.build(config, data.inputs)
  at = 0
  if workdir:
    ckpts = checkpoints.Checkpoints(workdir, config.checkpoint)
    try:
      steps = ckpts.all_steps()
      at = step if step is not None else (max(steps) if steps else None)
      if at is None or at not in steps:
        raise ConfigError(f"{workdir} has no checkpoint at step {at}"
                          f" (it has: {', '.join(map(str, sorted(steps))) or 'none'})")
      state = ckpts.read(at)
    finally:
      ckpts.close()
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  else:
    state = run.init_state()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
  stream = input_pipeline.train_batches(
      data.builder, config.data, seed=config.seed, global_batch=config.data.batch_size,
      start_step=0, split_info=data.train_split, process_index=0, process_count=1)
  result = summarise(layer_gradient_norms(run, variables, itertools.islice(stream, batches))
                     ["layers"])
  return dict(result, model=config.model.name, step=at, batches=batches,
              batch_size=config.data.batch_size, dataset=config.data.dataset,
              lowering=run.lowering.name, devices=jax.device_count())


def plot(results: list[dict], out: str) -> None:
  """Gradient norm against depth, one line per probe (log scale)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for r in results:
    ax.plot([l["depth"] for l in r["layers"]], [l["norm"] for l in r["layers"]],
            marker=".", label=f"{r['model']} (step {r['step']})")
  ax.set_yscale("log")
  ax.set_xlabel("layer (stem = 0 ... classifier)")
  ax.set_ylabel("gradient norm")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("--model", default="", help="model name (over the config's)")
  p.add_argument("--config", default="", help=f"config file[:arg] (default: "
                 f"{os.path.relpath(DEFAULT_CONFIG)}; with --workdir: its config.json)")
  p.add_argument("--workdir", default="", help="a run's workdir: its checkpoint and config")
  p.add_argument("--step", type=int, default=None, help="with --workdir: which checkpoint")
  p.add_argument("--batches", type=int, default=4, help="training batches to average over")
  p.add_argument("--json", default="", help="write the result to this file")
  p.add_argument("--plot", default="", help="write norm-vs-depth to this PNG")
  args, rest = p.parse_known_args(argv)
  from resnet_jax import config_cli
  from resnet_jax.config_schema import check_values
  from resnet_jax.errors import ConfigError
  try:
    overrides = config_cli.parse_overrides(rest)
    if args.batches < 1:
      raise ConfigError(f"--batches {args.batches}: expected >= 1")
    if args.workdir and not args.config:
      config = config_cli.load_recorded(args.workdir)
      config_cli.apply_overrides(config, overrides)
    else:
      config, _ = config_cli.resolve(args.config or DEFAULT_CONFIG, overrides)
    if args.model:
      config_cli.apply_overrides(config, {"model.name": args.model})
    import jax
    check_values(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    result = probe(config, batches=args.batches, workdir=args.workdir, step=args.step)
  except ConfigError as e:
    print(f"gradients: error: {e}", file=sys.stderr)
    return 2
  print(f"{result['model']} at step {result['step']}: gradient norms over {args.batches} "
        f"batch(es) of {result['batch_size']} ({result['dataset']})")
  for row in result["layers"]:
    print(f"{row['depth']:4d}  {row['layer']:40s} {row['norm']:10.4g}  (+- {row['std']:.2g})")
  print(f"first / last conv: {result['first_norm']:.4g} / {result['last_conv_norm']:.4g} = "
        f"{result['first_to_last_ratio']:.3g}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  if args.plot:
    plot([result], args.plot)
  return 0


if __name__ == "__main__":
  from resnet_jax import lowering
  lowering.prepare_process()   # CPU-backend processes only; see resnet_jax/lowering.py
  sys.exit(main())
