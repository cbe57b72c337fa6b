"""Learning-rate schedules and the optimizers (sgd, lars, lamb, adamw), built from the config,
with per-part learning-rate factors and frozen parts (fine-tuning) around any of them."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from resnet_jax import models
from resnet_jax.errors import ConfigError


def create_schedule(opt_cfg, sched_cfg, *, steps_per_epoch: int, total_steps: int):
  """The learning rate at each step: a warm-up, then cosine / poly / step / constant from the
  peak.

  Warm-up: warmup_steps (or warmup_epochs) long; "linear" rises from 0 to the peak,
  "constant" holds warmup_factor x peak (the ResNet paper's 0.01 for ResNet-110, with 0.1
  after it). Cosine decays from the peak to end_learning_rate at total_steps. Poly (MLPerf's
  polynomial decay) is end + (peak - end) x (1 - t / T)^poly_power, t counted from the end of
  the warm-up and T = total_steps - warm-up. Step decay multiplies by decay_factor at
  decay_steps (or decay_epochs), counted in absolute steps from the start, warm-up included."""
  peak = opt_cfg.learning_rate
  end = sched_cfg.end_learning_rate
  warmup = sched_cfg.warmup_steps or int(round(sched_cfg.warmup_epochs * steps_per_epoch))
  if sched_cfg.name == "cosine":
    # alpha = end / peak: cosine_decay_schedule's floor; 0.0 (the default) is today's decay.
    alpha = end / peak if peak > 0 else 0.0
    if warmup == 0:
      return optax.cosine_decay_schedule(peak, max(total_steps, 1), alpha=alpha)
    if sched_cfg.warmup_shape == "linear":
      return optax.warmup_cosine_decay_schedule(0.0, peak, warmup,
                                                max(total_steps, warmup + 1), end_value=end)
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=alpha)
    main = lambda step: cosine(step - warmup)  # noqa: E731
  elif sched_cfg.name == "poly":
    # In absolute steps: the decay starts where the warm-up ends.
    main = optax.polynomial_schedule(peak, end, sched_cfg.poly_power,
                                     max(total_steps - warmup, 1), transition_begin=warmup)
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


def _part(path) -> str:
  """The model part (models.part_of) of the leaf at `path` in a params tree."""
  top = path[0]
  return models.part_of(str(getattr(top, "key", getattr(top, "name", top))))


def _parts_of(key: str, names, model_parts) -> set[str]:
  if not model_parts:
    raise ValueError(f"{key} needs the model's parts (create_optimizer(..., model_parts="
                     "model.parts))")
  try:
    return models.expand_parts(names, tuple(model_parts))
  except ValueError as e:
    raise ConfigError(f"config key '{key}': {e}") from None


def lr_factors(entries, model_parts) -> dict[str, float]:
  """optimizer.lr_multipliers ("PART=FACTOR", "body" = all but the head) as {part: factor};
  a later entry overrides an earlier one for the parts they share ("body=0.1", "stage4=1")."""
  factors = {}
  for entry in entries:
    part, _, factor = entry.partition("=")
    for p in _parts_of("optimizer.lr_multipliers", [part.strip()], model_parts):
      factors[p] = float(factor)
  return factors


def scale_by_part(factors: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the update of every param of a part in `factors` by its factor."""

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      factor = factors.get(_part(path))
      return u if factor is None else u * jnp.asarray(factor, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_lars(weight_decay: float, trust_coefficient: float) -> optax.GradientTransformation:
  """The MLPerf ResNet reference's LARS scaling (its LARSOptimizer.compute_lr), before the
  learning rate and momentum: on a kernel (decay_mask), g -> (g + wd w) x ratio with
  ratio = eta ||w|| / (||g|| + wd ||w||) per array, 1 where ||w|| or ||g|| is 0 (epsilon 0);
  BN scales/biases and biases pass unchanged (no decay, no adaptation)."""

  def scale(g, w, adapt):
    if not adapt:
      return g
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w)))
    g_norm = jnp.sqrt(jnp.sum(jnp.square(g)))
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)
    ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, jnp.ones_like(ratio))
    return (g + weight_decay * w) * ratio

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lars needs the params: tx.update(grads, state, params)")
    return jax.tree.map(scale, updates, params, decay_mask(params)), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_adam(b1: float, b2: float, eps: float, restart=None) -> optax.GradientTransformation:
  """optax.scale_by_adam (same state, same arithmetic), except that the bias correction of a
  leaf for which `restart(path)` = S > 0 counts its steps from S: params frozen until step S
  have zero moments then, and their first update after it is bias-corrected as a first step
  (as PyTorch's per-param step does), not as step S + 1."""

  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)

    def step(path, m, v):
      start = restart(path) if restart is not None else 0
      t = jnp.maximum(count - start, 1) if start else count
      m_hat = m / (1 - b1 ** t).astype(m.dtype)
      v_hat = v / (1 - b2 ** t).astype(v.dtype)
      return m_hat / (jnp.sqrt(v_hat) + eps)

    updates = jax.tree_util.tree_map_with_path(step, mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


class FreezeState(NamedTuple):
  """The optimizer state with frozen parts: `count` updates were applied so far (the phase
  boundary is counted in these, so a resumed run is in the right phase)."""
  count: jax.Array
  inner_state: Any


def freeze_parts(inner: optax.GradientTransformation, frozen: set[str],
                 unfreeze_step: int = 0) -> optax.GradientTransformation:
  """`inner`, with the params of the `frozen` parts held still: while count < unfreeze_step
  (always when it is 0) `inner` sees a zero gradient and a zero param for them -- no moment,
  momentum, weight decay or trust ratio moves -- and their update is exactly -0.0 (p + -0.0
  is p bitwise, -0.0 included). From unfreeze_step on they train as any other; the state is
  one structure throughout."""

  def holds(path) -> bool:
    return _part(path) in frozen

  def init_fn(params):
    return FreezeState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update_fn(updates, state, params=None):
    still = jnp.asarray(True) if unfreeze_step == 0 else state.count < unfreeze_step

    def gate(fill):
      return lambda path, x: (jnp.where(still, jnp.asarray(fill, x.dtype), x) if holds(path)
                              else x)

    updates = jax.tree_util.tree_map_with_path(gate(0.0), updates)
    if params is not None:
      params = jax.tree_util.tree_map_with_path(gate(0.0), params)
    updates, inner_state = inner.update(updates, state.inner_state, params)
    updates = jax.tree_util.tree_map_with_path(gate(-0.0), updates)
    return updates, FreezeState(count=optax.safe_increment(state.count),
                                inner_state=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(opt_cfg, schedule, *, model_parts=(), frozen=(),
                     unfreeze_step: int = 0) -> optax.GradientTransformation:
  """The optimizer optimizer.name names, with `schedule` as its learning rate:

  sgd: coupled L2 on kernels (added to the gradient before momentum), as in PyTorch SGD and
    the paper, then momentum (Nesterov with optimizer.nesterov).
  lars: the MLPerf ResNet reference (scale_by_lars), then lr, then momentum.
  lamb: Adam's direction, decoupled decay on kernels, trust ratio ||w|| / ||u|| on kernels.
  adamw: Adam, decoupled decay on kernels (x lr, as optax.adamw / PyTorch AdamW).
  BN scales/biases and biases (1-D) get no weight decay and no trust ratio in any of them.

  optimizer.lr_multipliers multiply the final update of their parts; `frozen` (model.frozen:
  parts, or "body") hold their params still until `unfreeze_step` (0: for the whole run).
  `model_parts` (the model's `parts`) names the parts either may use."""
  name, wd = opt_cfg.name, opt_cfg.weight_decay
  frozen_parts = _parts_of("model.frozen", frozen, model_parts) if frozen else set()
  factors = lr_factors(opt_cfg.lr_multipliers, model_parts)
  restart = None
  if frozen_parts and unfreeze_step > 0:
    restart = lambda path: unfreeze_step if _part(path) in frozen_parts else 0  # noqa: E731
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov),
    )
  elif name == "lars":
    tx = optax.chain(
        scale_by_lars(wd, opt_cfg.trust_coefficient),
        optax.scale_by_learning_rate(schedule),
        optax.trace(decay=opt_cfg.momentum, nesterov=opt_cfg.nesterov),
    )
  elif name == "lamb":
    tx = optax.chain(
        scale_by_adam(opt_cfg.beta1, opt_cfg.beta2, opt_cfg.epsilon, restart),
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.masked(optax.scale_by_trust_ratio(), decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
  elif name == "adamw":
    tx = optax.chain(
        scale_by_adam(opt_cfg.beta1, opt_cfg.beta2, opt_cfg.epsilon, restart),
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
  else:
    raise ValueError(f"unknown optimizer {name!r}")
  # Only what the config asks for joins the chain: a run without either keeps the state
  # structure (and the checkpoints) of one from before they existed.
  if factors:
    tx = optax.chain(tx, scale_by_part(factors))
  if frozen_parts:
    tx = freeze_parts(tx, frozen_parts, unfreeze_step)
  return tx
