"""Learning-rate schedules and the SGD optimizer, built from the config."""

import jax
import optax


def create_schedule(opt_cfg, sched_cfg, *, steps_per_epoch: int, total_steps: int):
  peak = opt_cfg.learning_rate
  warmup = int(round(sched_cfg.warmup_epochs * steps_per_epoch))
  if sched_cfg.name == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
  if sched_cfg.name == "step":
    boundaries = {int(round(e * steps_per_epoch)): sched_cfg.decay_factor
                  for e in sched_cfg.decay_epochs if e > 0}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  elif sched_cfg.name == "constant":
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {sched_cfg.name!r}")
  if warmup == 0:
    return main
  # Boundaries stay in absolute steps: shift the main schedule back by the warmup.
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                               lambda step: main(step + warmup)], [warmup])


def decay_mask(params):
  """Weight decay on conv/dense kernels only: BN scales/biases and biases are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(opt_cfg, schedule) -> optax.GradientTransformation:
  # Coupled L2 (added to the gradient before momentum), as in PyTorch SGD and the paper.
  return optax.chain(
      optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov),
  )
