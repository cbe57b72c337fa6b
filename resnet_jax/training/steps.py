"""Pure train and eval steps: (state, batch) -> (state, metrics). Compiled by the caller."""

import jax
import jax.numpy as jnp
import optax

from resnet_jax import models


def normalize(images, mean, std):
  """uint8 NHWC images -> float32, per-channel standardised. Done on device so the host
  pipeline ships uint8 (4x less to transfer)."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def _micro_batches(x, k: int):
  """[B, ...] -> [k, B/k, ...] with micro-batch j = examples j, j+k, j+2k, ...

  Strided rather than contiguous: the batch is sharded in contiguous chunks over devices,
  so every micro-batch keeps an equal share on every device and no data moves.
  """
  return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)


def grad_norm_group(name: str, level: str) -> str:
  """The group a top-level parameter collection belongs to: its part (models.part_of), or
  for level "block" its block (stageN_blockM)."""
  if level == "block" and name.startswith("stage"):
    return name
  return models.part_of(name)


def grouped_grad_norms(grads, level: str) -> dict:
  """{"grad_norm/<group>": L2 norm of the group's gradients} in forward order."""
  groups: dict[str, list] = {}
  for name in grads:
    groups.setdefault(grad_norm_group(name, level), []).append(grads[name])
  return {f"grad_norm/{g}": optax.tree.norm(trees) for g, trees in groups.items()}


def make_train_step(model, tx, schedule, *, num_classes: int, label_smoothing: float,
                    mean, std, skip_nonfinite: bool = False, grad_accum_steps: int = 1,
                    ema_decay: float = 0.0, grad_norm_groups: str = "none"):
  """skip_nonfinite: an update whose loss, gradients or resulting params are not finite is
  rejected (state unchanged but for step and skipped_steps), instead of poisoning the run.
  grad_accum_steps=K: gradients are averaged over K micro-batches of B/K before one update;
  BatchNorm normalises each micro-batch by its own statistics and its running averages are
  updated K times (as K sequential forward passes would).
  ema_decay > 0: the state also tracks an exponential moving average of params and BN
  statistics.
  grad_norm_groups "stage" / "block": the metrics also hold the gradient norm of every stage
  (or block), the stem and the head, as "grad_norm/<group>"."""

  def loss_and_grads(params, batch_stats, images, labels, rng):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, updates.get("batch_stats", batch_stats))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, correct, new_stats, grads

  def train_step(state, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]
    rng = jax.random.fold_in(state.rng, state.step)
    k = grad_accum_steps
    if k == 1:
      loss, correct, batch_stats, grads = loss_and_grads(state.params, state.batch_stats,
                                                         images, labels, rng)
    else:
      def accumulate(carry, micro):
        grads_sum, loss_sum, correct_sum, stats = carry
        micro_images, micro_labels, index = micro
        loss, correct, stats, grads = loss_and_grads(
            state.params, stats, micro_images, micro_labels, jax.random.fold_in(rng, index))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, correct_sum + correct, stats), None

      init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
              jnp.zeros((), jnp.int32), state.batch_stats)
      (grads, loss, correct, batch_stats), _ = jax.lax.scan(
          accumulate, init, (_micro_batches(images, k), _micro_batches(labels, k),
                             jnp.arange(k)))
      grads = jax.tree.map(lambda g: g / k, grads)
      loss = loss / k

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if ema_decay > 0:
      ema = lambda old, new: ema_decay * old + (1.0 - ema_decay) * new  # noqa: E731
      new_state = new_state.replace(
          ema_params=jax.tree.map(ema, state.ema_params, params),
          ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats, batch_stats))
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
      kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
      new_state = kept.replace(step=state.step + 1,
                               skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
    metrics = {
        "loss": loss,
        "accuracy": correct / labels.shape[0],
        "learning_rate": schedule(state.step),
        "grad_norm": grad_norm,
        "param_norm": param_norm,    # of the updated params: catches an overflowing update
        "skipped_steps": new_state.skipped_steps,
    }
    if grad_norm_groups != "none":
      metrics.update(grouped_grad_norms(grads, grad_norm_groups))
    return new_state, metrics

  return train_step


def make_eval_step(model, *, num_classes: int, mean, std, use_ema: bool = False):
  top_k = min(5, num_classes)

  def eval_step(state, batch):
    """Sums over the real (mask=1) examples of the global batch."""
    images = normalize(batch["image"], mean, std)
    variables = ({"params": state.ema_params, "batch_stats": state.ema_batch_stats} if use_ema
                 else {"params": state.params, "batch_stats": state.batch_stats})
    logits = model.apply(variables, images, train=False)
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    _, top = jax.lax.top_k(logits, top_k)
    in_top_k = jnp.any(top == labels[:, None], axis=-1)
    return {
        "loss_sum": jnp.sum(loss * mask),
        "top1_correct": jnp.sum((top[:, 0] == labels) * mask),
        f"top{top_k}_correct": jnp.sum(in_top_k * mask),
        "count": jnp.sum(mask),
    }

  return eval_step
