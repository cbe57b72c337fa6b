"""Augmentation and losses: RandAugment / TrivialAugment / random erasing (data/augment.py) in
the train stream, seeded per example so the stream stays a function of (seed, step); mixup /
cutmix and BCE in the train step (training/steps.py); eval untouched (and at its own size);
a real run with all of it on resumes bit for bit."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
import pytest
import tensorflow as tf

from resnet_jax.config_schema import base_config
from resnet_jax.data import augment, datasets, input_pipeline as ip
from resnet_jax.training import state as state_lib, steps

from conftest import train_stream

OPS = augment.OPS
# No magnitude (autocontrast, equalize) or not the identity at 0 (solarize's threshold 255).
NOT_IDENTITY_AT_ZERO = {"autocontrast", "equalize", "solarize"}


def _photo(h=32, w=40):
  from sklearn.datasets import load_sample_image
  return load_sample_image("china.jpg")[150:150 + h, 300:300 + w]


def _digit():
  rng = np.random.RandomState(0)
  return (rng.randint(0, 17, (8, 8, 1)) * 15).astype(np.uint8)


def _seed(*values):
  return tf.constant(values, tf.int64)


def _map(fn, n):
  """fn(seed) for seeds (7, 0..n-1), traced once as the pipeline does (tf.data map)."""
  ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([tf.constant(7, tf.int64), i])))
  return np.stack(list(ds.as_numpy_iterator()))


# --- the ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [_photo(), _digit()], ids=["rgb", "gray"])
def test_every_op_keeps_uint8_and_shape_and_magnitude_zero_is_the_identity(image):
  t = tf.constant(image)
  for name in OPS:
    for space in (augment.RANDAUGMENT, augment.TRIVIAL_AUGMENT_WIDE):
      for sign in (1.0, -1.0):
        strong = augment.apply_op(t, OPS.index(name), 1.0, sign, space).numpy()
        assert strong.dtype == np.uint8 and strong.shape == image.shape, name
        np.testing.assert_array_equal(
            strong, augment.apply_op(t, OPS.index(name), 1.0, sign, space).numpy())
        zero = augment.apply_op(t, OPS.index(name), 0.0, sign, space).numpy()
        if name == "solarize":   # threshold 255: only pure white flips (as torchvision)
          np.testing.assert_array_equal(zero, np.where(image == 255, 0, image))
        elif name not in NOT_IDENTITY_AT_ZERO:
          np.testing.assert_array_equal(zero, image, err_msg=name)
    # Unchanged as in torchvision: color of gray; equalize of a channel of < 256 pixels.
    if name != "identity" and not (name == "color" and image.shape[-1] == 1) and not (
        name == "equalize" and image[..., 0].size < 256):
      strong = augment.apply_op(t, OPS.index(name), 1.0, 1.0).numpy()
      assert (strong != image).any(), f"{name} at full magnitude changes the image"


def test_ops_written_out_by_hand():
  image = _photo(12, 10)
  t = tf.constant(image)
  f = image.astype(np.float32)
  np.testing.assert_array_equal(augment.translate_x(t, 3.7).numpy()[:, 3:], image[:, :-3])
  assert (augment.translate_x(t, 3.7).numpy()[:, :3] == 0).all()
  np.testing.assert_array_equal(augment.translate_y(t, -2.0).numpy()[:-2], image[2:])
  np.testing.assert_array_equal(augment.brightness(t, 0.5).numpy(),
                                np.clip(1.5 * f, 0, 255).astype(np.uint8))
  np.testing.assert_array_equal(augment.posterize(t, 3.0).numpy(), image & 0b11100000)
  np.testing.assert_array_equal(augment.solarize(t, 100.0).numpy(),
                                np.where(image >= 100, 255 - image, image))
  auto = augment.autocontrast(t).numpy()
  assert (auto.min((0, 1)) == 0).all() and (auto.max((0, 1)) == 255).all()
  # Equalize: a monotone lookup table per channel that spreads the values over 0..255.
  eq = augment.equalize(t).numpy()
  for c in range(3):
    order = np.argsort(image[..., c], axis=None, kind="stable")
    assert (np.diff(eq[..., c].ravel()[order].astype(int)) >= 0).all()
  assert eq.max() >= 240


def test_randaugment_applies_n_drawn_ops_in_order_and_is_seeded():
  t = tf.constant(_photo())
  for s in range(4):
    seed = _seed(3, s)
    expected = t
    choices = augment.randaugment_choices(seed, 3)
    assert len(choices) == 3
    for op, sign in choices:
      expected = augment.apply_op(expected, op, 0.9, sign)
    out = augment.randaugment(t, seed, 3, 9.0).numpy()
    np.testing.assert_array_equal(out, expected.numpy())
    np.testing.assert_array_equal(out, augment.randaugment(t, seed, 3, 9.0).numpy())
  # Every op and both signs get drawn, in both of the N slots.
  draws = _map(lambda seed: tf.stack([tf.stack([tf.cast(op, tf.float32), sign]) for op, sign
                                      in augment.randaugment_choices(seed, 2)]), 100)
  for slot in range(2):
    assert set(draws[:, slot, 0].astype(int)) == set(range(len(OPS)))
    assert set(draws[:, slot, 1]) == {-1.0, 1.0}
  assert (draws[:, 0, 0] != draws[:, 1, 0]).mean() > 0.8
  outs = _map(lambda seed: augment.randaugment(tf.constant(_photo()), seed, 2, 9.0), 12)
  assert len({o.tobytes() for o in outs}) >= 11


def test_trivial_augment_draws_one_op_at_a_uniform_bin():
  draws = _map(lambda seed: tf.stack([tf.cast(x, tf.float32) for x in
                                      augment.trivial_augment_choice(seed)]), 150)
  ops = set(draws[:, 0].astype(int))
  levels = list(draws[:, 1])
  assert ops == set(range(len(OPS)))
  assert all(abs(lv * 30 - round(lv * 30)) < 1e-6 for lv in levels)
  assert len(set(levels)) >= 25
  t = tf.constant(_photo())
  op, level, sign = augment.trivial_augment_choice(_seed(7, 5))
  np.testing.assert_array_equal(
      augment.trivial_augment(t, _seed(7, 5)).numpy(),
      augment.apply_op(t, op, level, sign, augment.TRIVIAL_AUGMENT_WIDE).numpy())
  outs = _map(lambda seed: augment.trivial_augment(tf.constant(_photo()), seed), 12)
  assert len({o.tobytes() for o in outs}) >= 9   # identity and no-op draws may repeat


MEAN, STD = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)


def test_random_erasing_probability_box_and_noise():
  image = np.full((32, 32, 3), 7, np.uint8)   # noise is never exactly 7 in a whole box
  n = 400
  for p in (0.0, 0.25, 1.0):
    outs = _map(lambda seed, p=p: augment.random_erasing(tf.constant(image), seed, p, MEAN,
                                                         STD), n)
    erased = (outs != 7).any(-1)
    rate = erased.any((1, 2)).mean()
    # Binomial sd at p=0.25, n=400: 0.022; the box is found in nearly every try at 32x32.
    assert abs(rate - p) < 0.07, (p, rate)
    for mask in erased[erased.any((1, 2))][:100]:
      rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
      h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
      assert mask.sum() > 0.9 * h * w     # one rectangle (a few noise values may be 7)
      assert 0.02 * 1024 * 0.5 <= h * w <= 0.33 * 1024 * 1.3
      assert 0.3 / 2 <= h / w <= 3.3 * 2
  again = _map(lambda seed: augment.random_erasing(tf.constant(image), seed, 1.0, MEAN, STD), 4)
  np.testing.assert_array_equal(again, outs[:4])
  noise = outs[outs != 7].astype(np.float32)
  assert 90 < noise.mean() < 140 and 40 < noise.std() < 75   # mean/std in pixel units


# --- the train stream with augmentation on ----------------------------------------------------

@pytest.fixture(scope="module")
def digits(data_dir):
  cfg = base_config()
  cfg.data.data_dir = data_dir
  return datasets.prepare_builder(cfg.data)


def _digits_cfg(**kw):
  cfg = base_config().data
  cfg.crop_padding = 1
  for key, value in kw.items():
    cfg[key] = value
  return cfg


_stream = functools.partial(train_stream, seed=5)


def test_augmented_stream_is_a_function_of_seed_and_step(digits):
  cfg = _digits_cfg(randaugment_ops=2, randaugment_magnitude=9.0, random_erasing=0.5)
  full = [next(it) for it in [_stream(digits, cfg)] for _ in range(26)]  # 22 steps/epoch
  resumed = _stream(digits, cfg, start_step=20)
  for k in range(20, 26):
    np.testing.assert_array_equal(next(resumed)["image"], full[k]["image"])
  halves = [_stream(digits, cfg, process_index=i, process_count=2) for i in range(2)]
  for k in range(2):
    np.testing.assert_array_equal(
        np.concatenate([next(h)["image"] for h in halves]), full[k]["image"])
  plain = next(_stream(digits, _digits_cfg()))
  assert (plain["image"] != full[0]["image"]).mean() > 0.2
  np.testing.assert_array_equal(plain["label"], full[0]["label"])
  trivial = next(_stream(digits, _digits_cfg(trivial_augment=True), start_step=3))
  assert (trivial["image"] != full[3]["image"]).any()


def test_eval_batches_ignore_train_augmentation(digits):
  split = ip.process_split(digits, "test", drop_remainder=False)
  def eval_images(cfg):
    return np.concatenate([b["image"] for b in ip.eval_batches(
        digits, cfg, batch_size=128, split_info=split, num_batches=3, dataset_cache={})])
  np.testing.assert_array_equal(
      eval_images(_digits_cfg(randaugment_ops=3, random_erasing=1.0, mixup_alpha=1.0)),
      eval_images(_digits_cfg()))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """An encoded image folder: 2 classes of 64x48 JPEG crops of scikit-learn's photos."""
  from sklearn.datasets import load_sample_image
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.RandomState(0)
  for split, n in (("train", 8), ("test", 3)):
    for cls, name in enumerate(("china.jpg", "flower.jpg")):
      photo = load_sample_image(name)
      (root / split / f"c{cls}").mkdir(parents=True)
      for i in range(n):
        top, left = rng.randint(0, 300), rng.randint(0, 500)
        data = tf.io.encode_jpeg(photo[top:top + 48, left:left + 64], quality=90).numpy()
        (root / split / f"c{cls}" / f"{i}.jpg").write_bytes(data)
  return str(root)


def test_imagenet_path_augments_train_crops_and_evaluates_at_eval_image_size(photo_folder,
                                                                            tmp_path):
  def cfg(**kw):
    c = base_config().data
    c.dataset, c.image_folder, c.data_dir = "image_folder", photo_folder, str(tmp_path)
    c.preprocess, c.image_size, c.random_flip, c.channel_order = "imagenet", 24, True, "BGR"
    for key, value in kw.items():
      c[key] = value
    return c
  aug = cfg(randaugment_ops=2, random_erasing=0.5, eval_image_size=32)
  builder = datasets.prepare_builder(aug)
  assert ip.image_shape(builder, aug) == (24, 24, 3)    # the model's (train) shape
  split = ip.train_split_info(builder, aug)
  def stream(c, start_step=0):
    return ip.train_batches(builder, c, seed=1, global_batch=4, start_step=start_step,
                            split_info=split)
  first = [next(it) for it in [stream(aug)] for _ in range(6)]
  assert first[0]["image"].shape == (4, 24, 24, 3) and first[0]["image"].dtype == np.uint8
  resumed = stream(aug, start_step=3)
  for k in range(3, 6):
    np.testing.assert_array_equal(next(resumed)["image"], first[k]["image"])
  assert (next(stream(cfg()))["image"] != first[0]["image"]).mean() > 0.2

  test = ip.process_split(builder, "test", drop_remainder=False)
  def eval_images(c):
    return next(ip.eval_batches(builder, c, batch_size=6, split_info=test, num_batches=1,
                                dataset_cache={}))["image"]
  at_32 = eval_images(aug)
  assert at_32.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(at_32, eval_images(cfg(eval_image_size=32)))
  assert eval_images(cfg()).shape == (6, 24, 24, 3)
  bicubic = eval_images(cfg(eval_image_size=32, interpolation="bicubic"))
  assert (bicubic != at_32).any() and np.abs(bicubic.astype(int) - at_32).mean() < 8


# --- mixup / cutmix and the losses in the train step ------------------------------------------

@functools.lru_cache(maxsize=None)
def _mixer(mixup_alpha, cutmix_alpha, smoothing, n=8, size=(6, 10)):
  # Example i is the constant image i (every channel), so pixels name their source.
  images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None],
                            (n, *size, 3))
  targets = steps.soft_targets(jnp.arange(n) % 5, 5, smoothing)
  mix = jax.jit(lambda k: steps.mix_batch(k, images, targets, mixup_alpha=mixup_alpha,
                                          cutmix_alpha=cutmix_alpha))
  return np.asarray(images), np.asarray(targets), mix


def _mix(seed, *, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.0):
  images, targets, mix = _mixer(mixup_alpha, cutmix_alpha, smoothing)
  return (images, targets), tuple(np.asarray(x) for x in mix(jax.random.PRNGKey(seed)))


def test_symmetric_betas_have_the_beta_mean_and_variance():
  lams = jax.jit(jax.vmap(lambda k: steps.symmetric_betas(k, [0.2, 1.0])))(
      jax.random.split(jax.random.PRNGKey(0), 4000))
  lams = np.asarray(lams)
  assert ((lams >= 0) & (lams <= 1)).all() and np.isfinite(lams).all()
  for column, alpha in ((0, 0.2), (1, 1.0)):
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); sd of the estimates ~0.005.
    assert abs(lams[:, column].mean() - 0.5) < 0.03
    assert abs(lams[:, column].var() - 1 / (4 * (2 * alpha + 1))) < 0.015


def test_cutmix_pastes_the_flipped_partner_in_a_box_whose_area_is_one_minus_lambda():
  for seed in range(6):
    (images, targets), (mixed, mixed_targets, lam) = _mix(seed, cutmix_alpha=1.0,
                                                          smoothing=0.1)
    n = len(images)
    for i in range(n):
      from_partner = mixed[i, ..., 0] == n - 1 - i
      own = mixed[i, ..., 0] == i
      assert (from_partner | own).all()
      if i != n - 1 - i:
        np.testing.assert_allclose(1.0 - from_partner.mean(), lam, atol=1e-6)
        rows, cols = np.nonzero(from_partner.any(1))[0], np.nonzero(from_partner.any(0))[0]
        if from_partner.any():   # one rectangle
          assert from_partner.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1],
                               atol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(1), 1.0, atol=1e-6)


def test_mixup_blends_with_the_flipped_partner_and_smoothing_comes_first():
  (images, targets), (mixed, mixed_targets, lam) = _mix(3, mixup_alpha=0.4, smoothing=0.2)
  assert 0 < lam < 1
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)
  # Targets: lam * smooth(onehot(a)) + (1 - lam) * smooth(onehot(b)); smooth = 0.8 x + 0.04.
  onehot = np.eye(5)[np.arange(8) % 5]
  expected = lam * (0.8 * onehot + 0.04) + (1 - lam) * (0.8 * onehot[::-1] + 0.04)
  np.testing.assert_allclose(mixed_targets, expected, atol=1e-6)
  np.testing.assert_allclose(mixed_targets.sum(1), 1.0, atol=1e-6)
  # The same key mixes the same way; with both on, each batch is one or the other.
  np.testing.assert_array_equal(_mix(3, mixup_alpha=0.4, smoothing=0.2)[1][0], mixed)
  kinds = []
  for seed in range(40):
    (images, _), (mixed, _, lam) = _mix(seed, mixup_alpha=1.0, cutmix_alpha=1.0)
    is_cut = bool(np.isin(mixed, images).all())
    kinds.append(is_cut)
    if is_cut:
      np.testing.assert_allclose((mixed[0, ..., 0] == 7).mean(), 1 - lam, atol=1e-6)
    else:
      np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)
  assert 8 <= sum(kinds) <= 32, kinds


class _Tiny(nn.Module):
  """BatchNorm + a linear head: the step's whole contract (BN statistics, logits) at a small
  fraction of a ResNet's compile time."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


MEAN_1, STD_1 = (127.5,), (64.0,)


def _step(**kw):
  """(jitted train step, initial state) for _Tiny on 8x8x1 images, plain SGD."""
  model, tx = _Tiny(), optax.sgd(0.1)
  state = state_lib.make_init_fn(model, tx, (1, 8, 8, 1), seed=0)()
  step = steps.make_train_step(model, tx, lambda s: 0.1, num_classes=10, mean=MEAN_1,
                               std=STD_1, **{"label_smoothing": 0.1, **kw})
  return jax.jit(step), state, model


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, 8, 8, 1)).astype(np.uint8),
          "label": rng.randint(0, 10, (n,)).astype(np.int32)}


def test_bce_loss_is_the_sigmoid_cross_entropy_written_out():
  logits = np.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]], np.float32)
  targets = np.array([[1.0, 0.0, 0.0], [0.1, 0.3, 0.6]], np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = np.mean(np.sum(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)), -1))
  np.testing.assert_allclose(float(steps.bce_loss(logits, targets)), expected, rtol=1e-6)
  hard = (targets > 0.2).astype(np.float64)   # timm's target_threshold
  expected_hard = np.mean(np.sum(-(hard * np.log(p) + (1 - hard) * np.log(1 - p)), -1))
  np.testing.assert_allclose(float(steps.bce_loss(logits, targets, 0.2)), expected_hard,
                             rtol=1e-6)

  # In the train step: on the step's own logits, with smoothed one-hot targets.
  step, state, model = _step(loss="bce")
  batch = _batch()
  logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          steps.normalize(batch["image"], MEAN_1, STD_1), train=True,
                          mutable=["batch_stats"])
  z = np.asarray(logits, np.float64)
  t = np.full(z.shape, 0.1 / 10)
  t[np.arange(len(z)), batch["label"]] += 0.9
  expected = np.mean(np.sum(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))), -1))
  np.testing.assert_allclose(float(step(state, batch)[1]["loss"]), expected, rtol=1e-5)


def test_mixing_train_step_is_a_function_of_seed_and_step():
  batch = _batch(16)
  plain, state, _ = _step()
  mixing, _, _ = _step(mixup_alpha=0.8, cutmix_alpha=1.0)
  accumulating, _, _ = _step(mixup_alpha=0.8, cutmix_alpha=1.0, grad_accum_steps=2)
  a = mixing(state, batch)[1]["loss"]
  assert float(a) == float(mixing(state, batch)[1]["loss"])
  later = mixing(state.replace(step=state.step + 1), batch)[1]["loss"]
  assert float(later) != float(a)           # another step mixes another way
  assert float(plain(state, batch)[1]["loss"]) != float(a)
  # Accumulation splits the mixed batch: the same mixing, BN per micro-batch.
  assert np.isclose(float(accumulating(state, batch)[1]["loss"]), float(a), rtol=0.2)


# --- a real run with everything on resumes bit for bit ----------------------------------------

AUGMENTED = {"model.name": "resnet8", "num_train_steps": 12, "log_every_steps": 1,
             "checkpoint.every_steps": 100, "eval_every_epochs": 100,
             "data.randaugment_ops": 2, "data.randaugment_magnitude": 9,
             "data.random_erasing": 0.25, "data.mixup_alpha": 0.8, "data.cutmix_alpha": 1.0,
             "optimizer.loss": "bce", "optimizer.label_smoothing": 0.1,
             "optimizer.grad_accum_steps": 2}


def test_augmented_bce_run_stopped_and_resumed_is_bitwise_the_uninterrupted_run(
    data_dir, tmp_path):
  from resnet_jax import config_cli
  from resnet_jax.config_schema import check_keys_and_types, check_values
  from resnet_jax.training import trainer
  from conftest import DEFAULT_CONFIG, read_checkpoint, read_metrics

  def config(**extra):
    cfg = config_cli.load_config_file(DEFAULT_CONFIG)
    config_cli.apply_overrides(cfg, {"data.data_dir": data_dir,
                                     **{k: str(v) for k, v in {**AUGMENTED, **extra}.items()}})
    check_keys_and_types(cfg)
    check_values(cfg, num_devices=jax.device_count(), num_processes=1)
    return cfg

  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  trainer.train_and_evaluate(config(), full)
  assert trainer.train_and_evaluate(config(stop_after_steps=5), split) == {"step": 5,
                                                                           "stopped": True}
  assert trainer.train_and_evaluate(config(), split)["step"] == 12
  assert [m["step"] for m in read_metrics(split)] == list(range(1, 13))
  losses = [m["loss"] for m in read_metrics(full)]
  assert losses[0] > 4.0, "BCE summed over 10 classes starts near 10 log 2, softmax near 2.3"
  assert losses == [m["loss"] for m in read_metrics(split)]
  jax.tree.map(np.testing.assert_array_equal, read_checkpoint(full, 12),
               read_checkpoint(split, 12))
  assert os.path.isfile(os.path.join(full, "results.json"))
