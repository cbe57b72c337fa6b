"""Learning-rate schedules and the SGD optimizer, built from the config."""

import jax
import optax


def create_schedule(opt_cfg, sched_cfg, *, steps_per_epoch: int, total_steps: int):
  """The learning rate at each step: a warm-up, then cosine / step / constant from the peak.

  Warm-up: warmup_steps (or warmup_epochs) long; "linear" rises from 0 to the peak,
  "constant" holds warmup_factor x peak (the ResNet paper's 0.01 for ResNet-110, with 0.1
  after it). Step decay multiplies by decay_factor at decay_steps (or decay_epochs), counted
  in absolute steps from the start, warm-up included."""
  peak = opt_cfg.learning_rate
  warmup = sched_cfg.warmup_steps or int(round(sched_cfg.warmup_epochs * steps_per_epoch))
  if sched_cfg.name == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    if sched_cfg.warmup_shape == "linear":
      return optax.warmup_cosine_decay_schedule(0.0, peak, warmup,
                                                max(total_steps, warmup + 1))
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    main = lambda step: cosine(step - warmup)  # noqa: E731
  elif sched_cfg.name == "step":
    boundaries = (list(sched_cfg.decay_steps) if any(sched_cfg.decay_steps) else
                  [int(round(e * steps_per_epoch)) for e in sched_cfg.decay_epochs])
    main = optax.piecewise_constant_schedule(
        peak, {b: sched_cfg.decay_factor for b in boundaries if b > 0})
  elif sched_cfg.name == "constant":
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {sched_cfg.name!r}")
  if warmup == 0:
    return main
  if sched_cfg.warmup_shape == "constant":
    first = optax.constant_schedule(peak * sched_cfg.warmup_factor)
  else:
    first = optax.linear_schedule(0.0, peak, warmup)
  # Boundaries stay in absolute steps: join_schedules hands `main` the steps since the
  # warm-up ended, so shift them back.
  return optax.join_schedules([first, lambda step: main(step + warmup)], [warmup])


def decay_mask(params):
  """Weight decay on conv/dense kernels only: BN scales/biases and biases are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(opt_cfg, schedule) -> optax.GradientTransformation:
  # Coupled L2 (added to the gradient before momentum), as in PyTorch SGD and the paper.
  return optax.chain(
      optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov),
  )
