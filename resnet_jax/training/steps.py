"""Pure train and eval steps: (state, batch) -> (state, metrics). Compiled by the caller."""

import jax
import jax.numpy as jnp
import optax


def normalize(images, mean, std):
  """uint8 NHWC images -> float32, per-channel standardised. Done on device so the host
  pipeline ships uint8 (4x less to transfer)."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def make_train_step(model, tx, schedule, *, num_classes: int, label_smoothing: float,
                    mean, std, skip_nonfinite: bool = False):
  """skip_nonfinite: an update whose loss, gradients or resulting params are not finite is
  rejected (state unchanged but for step and skipped_steps), instead of poisoning the run."""
  def train_step(state, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_rng})
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
      kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
      new_state = kept.replace(step=state.step + 1,
                               skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": schedule(state.step),
        "grad_norm": grad_norm,
        "param_norm": param_norm,    # of the updated params: catches an overflowing update
        "skipped_steps": new_state.skipped_steps,
    }
    return new_state, metrics

  return train_step


def make_eval_step(model, *, num_classes: int, mean, std):
  top_k = min(5, num_classes)

  def eval_step(state, batch):
    """Sums over the real (mask=1) examples of the global batch."""
    images = normalize(batch["image"], mean, std)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         images, train=False)
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
