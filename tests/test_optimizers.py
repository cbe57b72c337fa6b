"""The optimizers (sgd, lars, lamb, adamw) against updates written out by hand in numpy, the
poly and cosine-to-an-end schedules against their formulas, per-part learning-rate factors,
and frozen parts (held bitwise still until unfreeze_step, one state structure throughout)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models
from resnet_jax.config_schema import base_config
from resnet_jax.errors import ConfigError
from resnet_jax.training import optimizer

PARTS = ("stem", "stage1", "stage2", "stage3", "head")
LR = lambda count: 0.05 * (count + 1)  # noqa: E731  (a schedule: the step is read from the state)


def _params(seed=0):
  """A tree shaped like a model's: conv kernel, BN scale/bias, a block's kernel, the head."""
  rng = np.random.RandomState(seed)
  f = lambda *shape, s=1.0, m=0.0: (m + s * rng.randn(*shape)).astype(np.float32)  # noqa: E731
  return {"stem_conv": {"kernel": f(3, 3, 2, 4, s=0.5)},
          "stem_bn": {"scale": f(4, s=0.1, m=1.0), "bias": f(4, s=0.1)},
          "stage1_block1": {"conv1": {"kernel": f(3, 3, 4, 4, s=0.3)}},
          "head": {"kernel": f(4, 3, s=0.2), "bias": f(3, s=0.1)}}


def _grads(params, seed):
  rng = np.random.RandomState(100 + seed)
  return jax.tree.map(lambda p: rng.randn(*p.shape).astype(np.float32), params)


def _flat(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(v, np.float64)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _opt_cfg(name, **overrides):
  cfg = base_config().optimizer
  cfg.name = name
  cfg.weight_decay = 0.05          # large enough to show in three steps
  cfg.trust_coefficient = 0.02
  cfg.beta1, cfg.beta2, cfg.epsilon = 0.8, 0.95, 1e-6
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def _run(tx, params, steps, jit=False):
  """(updates, params, states) after each of `steps` updates on the _grads sequence."""
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for t in range(steps):
    updates, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, params, state))
  return out


# --- hand-written references (numpy, float64) ------------------------------------------------

def _norm(x):
  return np.sqrt(np.sum(x * x))


def _reference(name, cfg, params, steps):
  """The updates of optimizer `name`, written out from the papers / the MLPerf reference."""
  w = _flat(params)
  m = {k: np.zeros_like(v) for k, v in w.items()}     # momentum / Adam's first moment
  v2 = {k: np.zeros_like(v) for k, v in w.items()}    # Adam's second moment
  wd, mom = cfg.weight_decay, cfg.momentum
  b1, b2, eps = cfg.beta1, cfg.beta2, cfg.epsilon
  all_updates = []
  for t in range(steps):
    g = _flat(_grads(jax.tree.map(np.asarray, params), t))
    lr = 0.05 * (t + 1)
    updates = {}
    for k in w:
      kernel = w[k].ndim > 1              # decay and trust ratio: kernels only
      if name == "sgd":                   # coupled L2, momentum, then lr (optax.sgd)
        d = g[k] + (wd * w[k] if kernel else 0)
        m[k] = d + mom * m[k]
        u = -lr * ((d + mom * m[k]) if cfg.nesterov else m[k])
      elif name == "lars":                # MLPerf: LARSOptimizer.compute_lr + ApplyMomentum
        if kernel:
          wn, gn = _norm(w[k]), _norm(g[k])
          ratio = (cfg.trust_coefficient * wn / (gn + wd * wn)) if wn > 0 and gn > 0 else 1.0
          d = (g[k] + wd * w[k]) * ratio
        else:                             # BN and biases: plain momentum SGD
          d = g[k]
        m[k] = mom * m[k] + lr * d        # the reference's momentum buffer
        u = -m[k]
      else:                               # lamb / adamw
        m[k] = b1 * m[k] + (1 - b1) * g[k]
        v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
        mh, vh = m[k] / (1 - b1 ** (t + 1)), v2[k] / (1 - b2 ** (t + 1))
        a = mh / (np.sqrt(vh) + eps)
        if kernel:
          a = a + wd * w[k]               # decoupled decay
          if name == "lamb":
            a = a * (_norm(w[k]) / _norm(a))
        u = -lr * a
      updates[k] = u
    for k in w:
      w[k] = w[k] + updates[k]
    params = _unflat_like(params, w)
    all_updates.append(updates)
  return all_updates


def _unflat_like(tree, flat):
  leaves = [np.asarray(flat["/".join(str(k.key) for k in path)], np.float32)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


@pytest.mark.parametrize("name,nesterov", [("sgd", False), ("sgd", True), ("lars", False),
                                           ("lamb", False), ("adamw", False)])
def test_each_optimizer_is_its_update_written_out_by_hand(name, nesterov):
  cfg = _opt_cfg(name, nesterov=nesterov)
  params = _params()
  got = _run(optimizer.create_optimizer(cfg, LR), params, 3)
  want = _reference(name, cfg, params, 3)
  for t, ((updates, _, _), expected) in enumerate(zip(got, want)):
    for k, u in _flat(updates).items():
      # float32 rounding, relative to the array (an element can cancel to near 0)
      np.testing.assert_allclose(u, expected[k], rtol=1e-5,
                                 atol=2e-6 * np.max(np.abs(expected[k])),
                                 err_msg=f"{name} step {t} {k}")
  # 1-D params (BN, biases): no weight decay and no trust ratio in any optimizer -- a zero
  # gradient leaves them where they are.
  zero = jax.tree.map(np.zeros_like, params)
  tx = optimizer.create_optimizer(cfg, LR)
  updates, _ = tx.update(zero, tx.init(params), params)
  ndim = {k: p.ndim for k, p in _flat(params).items()}
  for k, u in _flat(updates).items():
    assert np.any(u != 0) == (ndim[k] > 1), (name, k)


def test_lars_trust_ratio_is_one_where_a_norm_is_zero():
  """epsilon 0 as MLPerf: a zero kernel (or a zero gradient) takes the plain lr, no 0/0."""
  cfg = _opt_cfg("lars", momentum=0.0)
  params = {"head": {"kernel": np.zeros((4, 3), np.float32), "bias": np.ones(3, np.float32)}}
  grads = {"head": {"kernel": np.full((4, 3), 2.0, np.float32), "bias": np.ones(3, np.float32)}}
  tx = optimizer.create_optimizer(cfg, lambda count: 0.5)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["head"]["kernel"], np.full((4, 3), -1.0, np.float32))
  params["head"]["kernel"] = np.ones((4, 3), np.float32)
  grads["head"]["kernel"] = np.zeros((4, 3), np.float32)
  updates, _ = tx.update(grads, tx.init(params), params)   # ratio 1: -lr * wd * w
  np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * cfg.weight_decay, rtol=1e-6)


def test_lamb_and_adamw_match_optax():
  """Our Adam scaling is optax's: adamw equals optax.adamw, lamb optax's pieces with the
  trust ratio masked to the kernels."""
  params = _params()
  for name in ("adamw", "lamb"):
    cfg = _opt_cfg(name)
    if name == "adamw":
      ref = optax.adamw(LR, cfg.beta1, cfg.beta2, cfg.epsilon, weight_decay=cfg.weight_decay,
                        mask=optimizer.decay_mask)
    else:
      ref = optax.chain(optax.scale_by_adam(cfg.beta1, cfg.beta2, cfg.epsilon),
                        optax.add_decayed_weights(cfg.weight_decay, optimizer.decay_mask),
                        optax.masked(optax.scale_by_trust_ratio(), optimizer.decay_mask),
                        optax.scale_by_learning_rate(LR))
    for (u, _, s), (r, _, rs) in zip(_run(optimizer.create_optimizer(cfg, LR), params, 3),
                                     _run(ref, params, 3)):
      assert jax.tree.structure(s) == jax.tree.structure(rs)
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


# --- schedules --------------------------------------------------------------------------------

def _sched(name, **kw):
  cfg = base_config()
  cfg.optimizer.learning_rate = 2.0
  cfg.schedule.name = name
  for key, value in kw.items():
    setattr(cfg.schedule, key, value)
  return optimizer.create_schedule(cfg.optimizer, cfg.schedule, steps_per_epoch=10,
                                   total_steps=110)


@pytest.mark.parametrize("warmup,shape", [(0, "linear"), (10, "linear"), (10, "constant")])
def test_poly_and_cosine_to_an_end_follow_their_formulas(warmup, shape):
  peak, end, total = 2.0, 0.01, 110
  poly = _sched("poly", poly_power=2.0, end_learning_rate=end, warmup_steps=warmup,
                warmup_shape=shape)
  poly15 = _sched("poly", poly_power=1.5, end_learning_rate=0.0, warmup_steps=warmup,
                  warmup_shape=shape)
  cosine = _sched("cosine", end_learning_rate=end, warmup_steps=warmup, warmup_shape=shape)
  for s in (0, 1, 5, 9, 10, 11, 37, 60, 99, 109, 110, 130):
    if s < warmup:
      w = peak * s / warmup if shape == "linear" else peak * 0.1
      want_poly = want_poly15 = want_cos = w
    else:
      frac = min(s - warmup, total - warmup) / (total - warmup)
      want_poly = end + (peak - end) * (1 - frac) ** 2
      want_poly15 = peak * (1 - frac) ** 1.5
      want_cos = end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))
    for got, want, label in ((poly, want_poly, "poly"), (poly15, want_poly15, "poly 1.5"),
                             (cosine, want_cos, "cosine")):
      np.testing.assert_allclose(float(got(s)), want, rtol=2e-6, atol=1e-7,
                                 err_msg=f"{label} step {s}")
  assert np.isclose(float(poly(total)), end) and np.isclose(float(cosine(total)), end)


def test_cosine_end_zero_is_the_old_cosine_bitwise():
  for warmup in (0, 10):
    old = _sched("cosine", warmup_steps=warmup)
    new = _sched("cosine", warmup_steps=warmup, end_learning_rate=0.0)
    steps = jnp.arange(120)
    assert np.asarray(jax.vmap(old)(steps)).tobytes() == np.asarray(jax.vmap(new)(steps)).tobytes()


# --- per-part learning rates ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "lars", "lamb", "adamw"])
def test_a_parts_update_is_exactly_its_factor_times_the_plain_update(name):
  params = _params()
  plain = optimizer.create_optimizer(_opt_cfg(name), LR, model_parts=PARTS)
  scaled = optimizer.create_optimizer(_opt_cfg(name, lr_multipliers=("head=10",)), LR,
                                      model_parts=PARTS)
  sp, ss = plain.init(params), scaled.init(params)
  for t in range(3):                                  # the same params into both each step
    g = _grads(params, t)
    up, sp = plain.update(g, sp, params)
    us, ss = scaled.update(g, ss, params)
    fp, fs = _flat(up), _flat(us)
    for k in fp:
      factor = np.float32(10) if k.startswith("head/") else np.float32(1)
      assert (np.float32(fp[k]) * factor).tobytes() == np.float32(fs[k]).tobytes(), (t, k)
    params = optax.apply_updates(params, up)


def test_body_and_later_entries_in_lr_multipliers():
  params = _params()
  grads = _grads(params, 0)
  cfg = _opt_cfg("sgd", weight_decay=0.0, momentum=0.0)
  plain = optimizer.create_optimizer(cfg, LR)
  base = _flat(plain.update(grads, plain.init(params), params)[0])
  cfg.lr_multipliers = ("body=0.5", "stage1=2")
  tx = optimizer.create_optimizer(cfg, LR, model_parts=PARTS)
  got = _flat(tx.update(grads, tx.init(params), params)[0])
  for k, u in got.items():
    factor = 1.0 if k.startswith("head") else 2.0 if k.startswith("stage1") else 0.5
    np.testing.assert_array_equal(u, np.float32(base[k]) * np.float32(factor), err_msg=k)


# --- freezing ---------------------------------------------------------------------------------

def _stem_state_leaves(state):
  """The optimizer-state leaves that belong to stem params (momentum, Adam's moments)."""
  return [np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(state)[0]
          if any(getattr(k, "key", None) in ("stem_conv", "stem_bn") for k in path)]


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb", "adamw"])
def test_frozen_parts_stay_bitwise_until_the_boundary_then_train(name):
  params = _params()
  params["stem_bn"]["bias"][0] = -0.0          # a negative zero stays negative too
  cfg = _opt_cfg(name, lr_multipliers=("stem=3",))
  tx = optimizer.create_optimizer(cfg, LR, model_parts=PARTS, frozen=("stem",),
                                  unfreeze_step=2)
  free = optimizer.create_optimizer(cfg, LR, model_parts=PARTS)
  run, free_run = _run(tx, params, 4), _run(free, params, 1)   # eager: same ops, same bits
  structure = jax.tree.structure(tx.init(params))
  shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(tx.init(params))]
  for t, (updates, new, state) in enumerate(run):
    assert jax.tree.structure(state) == structure
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == shapes
    assert int(state.count) == t + 1
    for k in ("stem_conv", "stem_bn"):
      same = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                 for a, b in zip(jax.tree.leaves(params[k]), jax.tree.leaves(new[k])))
      assert same == (t < 2), (name, t, k)   # updates 0 and 1 frozen, 2 and 3 move it
    for k in ("stage1_block1", "head"):
      assert all(np.any(np.asarray(a) != np.asarray(b))
                 for a, b in zip(jax.tree.leaves(params[k]), jax.tree.leaves(new[k])))
    if t == 1:                                    # at the boundary: nothing accumulated
      assert all(not np.any(x) for x in _stem_state_leaves(state))
    params = new
  # The others train exactly as without freezing (first step: the same params into both).
  for k in ("stage1_block1", "head"):
    for a, b in zip(jax.tree.leaves(run[0][0][k]), jax.tree.leaves(free_run[0][0][k])):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb", "adamw"])
def test_the_first_update_after_unfreezing_is_a_first_step(name):
  """From the boundary a frozen param trains as if its optimizer had just started: no
  momentum, Adam's bias correction from step 1 (the schedule still at the global step)."""
  cfg = _opt_cfg(name)
  params = _params()
  tx = optimizer.create_optimizer(cfg, LR, model_parts=PARTS, frozen=("stem",),
                                  unfreeze_step=2)
  state = tx.init(params)
  for t in range(3):
    updates, state = tx.update(_grads(params, t), state, params)
  g, w = _flat(_grads(params, 2)), _flat(params)
  lr = 0.05 * 3
  for k in ("stem_conv/kernel", "stem_bn/scale"):
    kernel = w[k].ndim > 1
    if name in ("sgd", "lars"):
      d = g[k] + (cfg.weight_decay * w[k] if kernel else 0)
      if name == "lars" and kernel:
        wn, gn = _norm(w[k]), _norm(g[k])
        d = d * cfg.trust_coefficient * wn / (gn + cfg.weight_decay * wn)
      want = -lr * d
    else:
      a = g[k] / (np.abs(g[k]) + cfg.epsilon)     # m_hat = g, v_hat = g^2 at step 1
      if kernel:
        a = a + cfg.weight_decay * w[k]
        if name == "lamb":
          a = a * _norm(w[k]) / _norm(a)
      want = -lr * a
    np.testing.assert_allclose(_flat(updates)[k], want, rtol=2e-5, err_msg=f"{name} {k}")


def test_frozen_forever_ignores_weight_decay_and_a_resumed_state_keeps_its_phase():
  params = _params()
  cfg = _opt_cfg("sgd", weight_decay=0.5)
  forever = optimizer.create_optimizer(cfg, LR, model_parts=PARTS, frozen=("stem",))
  for _, new, _ in _run(forever, params, 3):
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(params["stem_conv"]),
                               jax.tree.leaves(new["stem_conv"])))
  # Resume after one update with a freshly built optimizer: the phase comes from the state.
  make = lambda: optimizer.create_optimizer(cfg, LR, model_parts=PARTS,  # noqa: E731
                                            frozen=("stem",), unfreeze_step=2)
  whole = _run(make(), params, 3, jit=True)     # jitted both: the same program, the same bits
  _, p1, s1 = whole[0]
  tx = make()
  for t in (1, 2):
    updates, s1 = jax.jit(tx.update)(_grads(p1, t), s1, p1)
    p1 = optax.apply_updates(p1, updates)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(whole[t][1])):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_body_freezes_all_but_the_head_of_a_real_model():
  model = models.create("resnet8", num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes["params"])
  tx = optimizer.create_optimizer(_opt_cfg("adamw"), LR, model_parts=model.parts,
                                  frozen=("body",))
  updates, _ = tx.update(jax.tree.map(np.ones_like, params), tx.init(params), params)
  moved = {k for k, u in _flat(updates).items() if np.any(u != 0)}
  assert moved == {"head/kernel", "head/bias"}


def test_an_unknown_part_is_a_config_error_naming_the_key():
  cfg = _opt_cfg("sgd")
  with pytest.raises(ConfigError, match=r"config key 'model.frozen': unknown part 'stage9'; "
                     r"this model has stem, stage1, stage2, stage3, head \(and 'body'"):
    optimizer.create_optimizer(cfg, LR, model_parts=PARTS, frozen=("stage9",))
  cfg.lr_multipliers = ("stem=2", "final=10")
  with pytest.raises(ConfigError, match=r"config key 'optimizer.lr_multipliers': unknown "
                     r"part 'final'"):
    optimizer.create_optimizer(cfg, LR, model_parts=PARTS)


def test_without_freezing_or_factors_the_state_is_todays():
  """Old checkpoints resume: the default sgd chain (and its state) is unchanged."""
  cfg = base_config().optimizer
  params = _params()
  today = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=optimizer.decay_mask),
                      optax.sgd(LR, momentum=cfg.momentum, nesterov=cfg.nesterov))
  for tx in (optimizer.create_optimizer(cfg, LR),
             optimizer.create_optimizer(cfg, LR, model_parts=PARTS)):
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(today.init(params))
    for (u, _, _), (r, _, _) in zip(_run(tx, params, 2), _run(today, params, 2)):
      assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                 for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)))
