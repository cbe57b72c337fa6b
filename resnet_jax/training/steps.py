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


LOSSES = ("softmax", "bce")
# Folded into the step's key for the mixup/cutmix draws (micro-batch dropout keys fold in the
# micro-batch index 0..K-1, far below this).
_MIX_RNG_TAG = 0x6D697821


def soft_targets(labels, num_classes: int, label_smoothing: float):
  """Smoothed one-hot targets: 1 - s + s/C on the label, s/C elsewhere (timm's on/off
  values)."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def bce_loss(logits, targets, target_threshold: float = 0.0):
  """Sigmoid binary cross-entropy summed over classes, averaged over the batch. (timm's
  BinaryCrossEntropy averages over classes too, i.e. 1/C of this, unless sum_classes=True.)
  target_threshold > 0: targets become 1 where above it, else 0 (timm's target_threshold,
  0.2 in the ResNet-strikes-back recipes), after smoothing and mixing."""
  if target_threshold > 0:
    targets = (targets > target_threshold).astype(targets.dtype)
  return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()


def cutmix_box(rng, lam, height: int, width: int):
  """timm's rand_bbox: a box of about (1 - lam) of the area, centred on a uniform pixel,
  clipped to the image: (top, bottom, left, right), bottom/right exclusive."""
  cut_rat = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut_rat).astype(jnp.int32)     # int(): floors a positive value
  cut_w = (width * cut_rat).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def symmetric_betas(rng, alphas):
  """One draw of Beta(a, a) for each a of `alphas`, as jax.random.beta computes it (ratio of
  two gamma draws, in log space so small alphas do not underflow to 0/0), from one
  vectorised log-gamma draw: one rejection sampler to compile instead of two per Beta."""
  a = jnp.asarray([alpha for alpha in alphas for _ in range(2)], jnp.float32)
  log_gamma = jax.random.loggamma(rng, a).reshape(len(alphas), 2)
  gamma = jnp.exp(log_gamma - jnp.max(log_gamma, axis=-1, keepdims=True))
  return gamma[:, 0] / jnp.sum(gamma, axis=-1)


def mix_batch(rng, images, targets, *, mixup_alpha: float, cutmix_alpha: float):
  """timm's Mixup (mode "batch", prob 1, correct_lam) on a whole global batch: every example
  i mixed with example B-1-i (the batch flipped) by one lam ~ Beta(alpha, alpha); with both
  alphas > 0, cutmix or mixup with probability 1/2 each. Cutmix pastes the partner's pixels
  in a cutmix_box and sets lam to the area kept. Targets (already one-hot or smoothed) become
  lam * own + (1 - lam) * partner's. Returns (images, targets, lam)."""
  if not (mixup_alpha > 0 or cutmix_alpha > 0):
    raise ValueError("mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0")
  k_switch, k_lam, k_box = jax.random.split(rng, 3)
  partner_images, partner_targets = images[::-1], targets[::-1]
  height, width = images.shape[1], images.shape[2]
  lams = symmetric_betas(k_lam, [a for a in (mixup_alpha, cutmix_alpha) if a > 0])
  if mixup_alpha > 0:
    lam_mixup = lams[0]
  if cutmix_alpha > 0:
    lam_cut = lams[-1]
    top, bottom, left, right = cutmix_box(k_box, lam_cut, height, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    box = (((rows >= top) & (rows < bottom))[:, None] &
           ((cols >= left) & (cols < right))[None, :])
    lam_cut = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    cut_images = jnp.where(box[None, :, :, None], partner_images, images)
  if mixup_alpha > 0:
    mixed_images = lam_mixup * images + (1.0 - lam_mixup) * partner_images
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < 0.5
    lam = jnp.where(use_cutmix, lam_cut, lam_mixup)
    images = jnp.where(use_cutmix, cut_images, mixed_images)
  elif cutmix_alpha > 0:
    lam, images = lam_cut, cut_images
  elif mixup_alpha > 0:
    lam, images = lam_mixup, mixed_images
  targets = lam * targets + (1.0 - lam) * partner_targets
  return images, targets, lam


def make_train_step(model, tx, schedule, *, num_classes: int, label_smoothing: float,
                    mean, std, skip_nonfinite: bool = False, grad_accum_steps: int = 1,
                    ema_decay: float = 0.0, grad_norm_groups: str = "none",
                    loss: str = "softmax", mixup_alpha: float = 0.0,
                    cutmix_alpha: float = 0.0, bce_target_threshold: float = 0.0):
  """skip_nonfinite: an update whose loss, gradients or resulting params are not finite is
  rejected (state unchanged but for step and skipped_steps), instead of poisoning the run.
  grad_accum_steps=K: gradients are averaged over K micro-batches of B/K before one update;
  BatchNorm normalises each micro-batch by its own statistics and its running averages are
  updated K times (as K sequential forward passes would).
  ema_decay > 0: the state also tracks an exponential moving average of params and BN
  statistics.
  grad_norm_groups "stage" / "block": the metrics also hold the gradient norm of every stage
  (or block), the stem and the head, as "grad_norm/<group>".
  loss: "softmax" cross-entropy, or "bce" (bce_loss, with bce_target_threshold), on the
  label-smoothed targets.
  mixup_alpha / cutmix_alpha > 0: the normalised global batch and its smoothed targets are
  mixed (mix_batch) before any micro-batching, with a key folded from the state's rng and
  the step: the same (seed, step) mixes the same way, on any device or process count (the
  partner of global example i is example B-1-i) and for any grad_accum_steps (which only
  splits the mixed batch). The accuracy metric compares with each example's own label."""
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  use_bce = loss == "bce"      # `loss` is a metric's name below
  mixing = mixup_alpha > 0 or cutmix_alpha > 0

  def loss_and_grads(params, batch_stats, images, labels, rng, targets=None):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      y = soft_targets(labels, num_classes, label_smoothing) if targets is None else targets
      if use_bce:
        value = bce_loss(logits, y, bce_target_threshold)
      else:
        value = optax.softmax_cross_entropy(logits, y).mean()
      return value, (logits, updates.get("batch_stats", batch_stats))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, correct, new_stats, grads

  def train_step(state, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]
    rng = jax.random.fold_in(state.rng, state.step)
    targets = None
    if mixing:
      images, targets, _ = mix_batch(
          jax.random.fold_in(rng, _MIX_RNG_TAG), images,
          soft_targets(labels, num_classes, label_smoothing),
          mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    k = grad_accum_steps
    if k == 1:
      loss, correct, batch_stats, grads = loss_and_grads(state.params, state.batch_stats,
                                                         images, labels, rng, targets)
    else:
      def accumulate(carry, micro):
        grads_sum, loss_sum, correct_sum, stats = carry
        micro_images, micro_labels, micro_targets, index = micro
        loss, correct, stats, grads = loss_and_grads(
            state.params, stats, micro_images, micro_labels, jax.random.fold_in(rng, index),
            micro_targets)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, correct_sum + correct, stats), None

      init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
              jnp.zeros((), jnp.int32), state.batch_stats)
      micro_targets = None if targets is None else _micro_batches(targets, k)
      (grads, loss, correct, batch_stats), _ = jax.lax.scan(
          accumulate, init, (_micro_batches(images, k), _micro_batches(labels, k),
                             micro_targets, jnp.arange(k)))
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
  """The eval loss is softmax cross-entropy whatever the train loss (as timm validates a
  BCE-trained model), so runs compare; eval images are never mixed."""
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
