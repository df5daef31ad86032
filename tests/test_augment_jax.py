"""The on-device backend against the tf.data reference: same parameters -> same views."""
import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from care_jax import augment, augment_jax, config_lib, train

CFG = augment.AugmentConfig(image_size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _crop_only_params(boxes):
  """NumPy parameters that crop each image to its box (i, j, h, w) and do nothing else."""
  n, off = len(boxes), np.zeros(len(boxes), bool)
  return {"crop": boxes, "flip": off, "jitter": off, "brightness": np.ones(n, np.float32),
          "contrast": np.ones(n, np.float32), "saturation": np.ones(n, np.float32),
          "jitter_order": np.tile(np.arange(4, dtype=np.int32), (n, 1)), "hue": np.zeros(n, np.float32),
          "grayscale": off, "blur": off, "blur_sigma": np.ones(n, np.float32)}


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("source_size", [16, 28])  # same size, and a resize (Fashion-MNIST 28 -> 16 here)
def test_same_parameters_give_the_same_views_as_tf(source_size, antialias):
  cfg = dataclasses.replace(CFG, antialias=antialias)
  images = _images(64, source_size)
  params = augment.sample_params(tf.constant([3, 4], tf.int64), 64, source_size, source_size, cfg)
  # Force every branch to appear: half the images jittered/grey/blurred, the rest not.
  params = {k: v.numpy() for k, v in params.items()}
  for key in ("jitter", "grayscale", "blur", "flip"):
    params[key] = np.arange(64) % (2 if key != "grayscale" else 4) == 0
  want = augment.apply(tf.constant(images), {k: tf.constant(v) for k, v in params.items()}, cfg).numpy()
  got = np.asarray(jax.jit(augment_jax.apply, static_argnums=2)(jnp.asarray(images), params, cfg))
  # Bilinear taps and the hue round trip differ in float rounding only; the
  # views are in normalised units (std 0.2-0.3), so 2e-3 is ~1/8 of a grey level.
  np.testing.assert_allclose(got, want, atol=2e-3)
  assert np.abs(got - want).mean() < 1e-4


def test_views_cropped_from_a_larger_source_keep_its_detail():
  # source_image_size: the release's STL-10 crops 32x32 views out of 96x96 images.
  # A one-pixel checkerboard at 32x32 resized to 16 first is flat grey; a 16x16 box
  # of the 32x32 source must come out as exactly its pixels, on both backends.
  from care_jax import datasets
  board = (np.add.outer(np.arange(32), np.arange(32)) % 2 * 255).astype(np.uint8)
  images = np.repeat(np.broadcast_to(board[None, :, :, None], (2, 32, 32, 1)), 3, axis=3)
  assert np.ptp(datasets.to_rgb_size(images, 16)[:, 2:-2, 2:-2]) <= 2  # the detail a pre-resize loses
  boxes = np.array([[8, 4, 16, 16], [3, 11, 16, 16]], np.float32)  # (i, j, h, w)
  params = _crop_only_params(boxes)
  want = np.stack([images[k, i:i + 16, j:j + 16] for k, (i, j, _, _) in enumerate(boxes.astype(int))])
  want = (want / 255.0 - np.asarray(CFG.mean)) / np.asarray(CFG.std)
  tf_views = augment.apply(tf.constant(images), {k: tf.constant(v) for k, v in params.items()}, CFG).numpy()
  jax_views = np.asarray(jax.jit(augment_jax.apply, static_argnums=2)(jnp.asarray(images), params, CFG))
  np.testing.assert_allclose(tf_views, want, atol=1e-4)
  np.testing.assert_allclose(jax_views, want, atol=1e-4)


@pytest.mark.parametrize("box", [(5, 7, 30, 36), (0, 0, 48, 48), (10, 3, 9, 12)])  # down, down, up
def test_antialiased_crops_resample_as_pil_on_both_backends(box):
  # resize_antialias: torchvision's resized_crop on a PIL image, which the releases
  # run: crop the box, then PIL's bilinear resize (antialiased when shrinking). PIL
  # rounds to uint8 between its two passes, hence the one-grey-level tolerance.
  from PIL import Image
  cfg = augment.AugmentConfig(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3, antialias=True)
  image = _images(1, 48, seed=4)
  i, j, h, w = box
  want = np.asarray(Image.fromarray(image[0]).crop((j, i, j + w, i + h)).resize((16, 16), Image.BILINEAR),
                    np.float32)
  params = _crop_only_params(np.array([box], np.float32))
  tf_view = augment.apply(tf.constant(image), {k: tf.constant(v) for k, v in params.items()}, cfg).numpy()[0]
  jax_view = np.asarray(jax.jit(augment_jax.apply, static_argnums=2)(jnp.asarray(image), params, cfg))[0]
  for view in (tf_view, jax_view):
    assert np.abs(view * 255 - want).max() <= 1.0 and np.abs(view * 255 - want).mean() < 0.35
  # crop_and_resize's taps (antialias off) alias when shrinking: far from PIL there.
  if h > 16:
    plain = augment.apply(tf.constant(image), {k: tf.constant(v) for k, v in params.items()},
                          dataclasses.replace(cfg, antialias=False)).numpy()[0]
    assert np.abs(plain * 255 - want).mean() > 5


def _pil_adjust_hue(image, factor):
  # torchvision's adjust_hue on a PIL image: PIL's 8-bit HSV, the hue channel shifted
  # by int(factor * 255) with wrap-around.
  from PIL import Image
  h, s, v = image.convert("HSV").split()
  h = Image.fromarray(((np.asarray(h, np.int32) + int(factor * 255)) % 256).astype(np.uint8), "L")
  return Image.merge("HSV", (h, s, v)).convert("RGB")


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_colour_jitter_ops_match_torchvision_on_pil_images_on_both_backends(op):
  # The releases' ColorJitter runs on PIL images: torchvision calls PIL's
  # ImageEnhance Brightness / Contrast (blend with the rounded mean luma) / Color
  # (blend with the luma image) and shifts PIL's 8-bit hue. Images with a colour
  # cast, so a per-channel mean (tf.image.adjust_contrast's) would be caught.
  from PIL import Image, ImageEnhance
  enhance = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
             "saturation": ImageEnhance.Color}
  rng = np.random.default_rng(7)
  n = 8
  images = (rng.integers(0, 256, (n, 16, 16, 3)) * rng.uniform(0.15, 1.0, (n, 1, 1, 3))).astype(np.uint8)
  factors = (rng.uniform(-0.1, 0.1, n) if op == "hue" else rng.uniform(0.6, 1.4, n)).astype(np.float32)
  pil = lambda f: np.stack([np.asarray(_pil_adjust_hue(Image.fromarray(x), float(v)) if op == "hue" else
                                       enhance[op](Image.fromarray(x)).enhance(float(v)), np.float32)
                            for x, v in zip(images, f)])
  want = pil(factors)
  params = _crop_only_params(np.tile(np.array([0, 0, 16, 16], np.float32), (n, 1)))
  params["jitter"] = np.ones(n, bool)
  params[op] = factors
  cfg = dataclasses.replace(CFG, mean=(0.0,) * 3, std=(1.0,) * 3)
  tf_views = augment.apply(tf.constant(images), {k: tf.constant(v) for k, v in params.items()}, cfg).numpy()
  jax_views = np.asarray(jax.jit(augment_jax.apply, static_argnums=2)(jnp.asarray(images), params, cfg))
  for views in (tf_views, jax_views):
    error = np.abs(views * 255 - want)
    if op == "hue":
      # PIL's hue has 256 steps a turn, ~6 grey levels each on a saturated pixel
      # (measured: mean 0.5, 99th percentile 5.2 grey levels); the opposite shift: mean 30.
      assert error.mean() < 1.0 and np.percentile(error, 99) < 8
      assert np.abs(views * 255 - pil(-factors)).mean() > 10
    else:
      assert error.max() <= 1.5  # PIL rounds to uint8 (measured: at most 1.18)


def test_sampled_parameters_follow_the_reference_distributions():
  n = 4000
  jp = jax.device_get(augment_jax.sample_params(jax.random.PRNGKey(0), n, 32, 32, CFG))
  tp = {k: v.numpy() for k, v in augment.sample_params(tf.constant([0, 1], tf.int64), n, 32, 32, CFG).items()}
  assert set(jp) == set(tp)
  for key in ("flip", "jitter", "grayscale", "blur"):
    assert abs(jp[key].mean() - tp[key].mean()) < 0.04, key
  for key in ("brightness", "contrast", "saturation", "hue", "blur_sigma"):
    assert abs(jp[key].mean() - tp[key].mean()) < 0.02 and abs(jp[key].std() - tp[key].std()) < 0.02, key
  area = lambda p: (p["crop"][:, 2] * p["crop"][:, 3]).mean() / (32 * 32)
  assert abs(area(jp) - area(tp)) < 0.03
  crop = jp["crop"]
  assert (crop[:, 0] >= 0).all() and (crop[:, 0] + crop[:, 2] <= 32).all()
  assert (crop[:, 1] >= 0).all() and (crop[:, 1] + crop[:, 3] <= 32).all()
  for row in jp["jitter_order"][:50]:
    assert sorted(row) == [0, 1, 2, 3]


# Beyond the defaults too: amounts over 1, where torchvision's ColorJitter clamps
# the factor's lower bound at 0 (its _check_input), and other probabilities.
_STRONG = dataclasses.replace(CFG, brightness=1.5, contrast=0.9, saturation=2.0, hue=0.5, flip_prob=0.3,
                              jitter_prob=0.6, grayscale_prob=0.4, blur_prob=0.7, blur_sigma=(0.5, 3.0))


@pytest.mark.parametrize("cfg", [CFG, _STRONG], ids=["release", "strong"])
@pytest.mark.parametrize("backend", ["tf", "jax"])
def test_sampled_parameters_match_torchvisions_closed_forms(backend, cfg):
  # Independent truth, not one backend against the other: torchvision's
  # ColorJitter draws each factor from U[max(0, 1 - a), 1 + a] and the hue
  # shift from U[-h, h]; GaussianBlur's sigma from U[lo, hi]; each op fires
  # with its probability (4-sigma bounds at n = 4000).
  n = 4000
  if backend == "jax":
    p = jax.device_get(augment_jax.sample_params(jax.random.PRNGKey(3), n, 32, 32, cfg))
  else:
    p = {k: v.numpy() for k, v in augment.sample_params(tf.constant([3, 4], tf.int64), n, 32, 32, cfg).items()}
  for key, prob in (("flip", cfg.flip_prob), ("jitter", cfg.jitter_prob), ("grayscale", cfg.grayscale_prob),
                    ("blur", cfg.blur_prob)):
    assert abs(p[key].mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n), key
  ranges = {name: (max(0.0, 1.0 - getattr(cfg, name)), 1.0 + getattr(cfg, name))
            for name in ("brightness", "contrast", "saturation")}
  ranges["hue"], ranges["blur_sigma"] = (-cfg.hue, cfg.hue), cfg.blur_sigma
  for key, (lo, hi) in ranges.items():
    x = np.asarray(p[key], np.float64)
    assert lo <= x.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < x.max() <= hi, key
    assert abs(x.mean() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * n), key
    assert abs(x.std() - (hi - lo) / math.sqrt(12)) < 0.02 * (hi - lo), key
  # The jitter order: a uniform permutation, so each op leads a quarter of the time.
  first = np.bincount(np.asarray(p["jitter_order"])[:, 0], minlength=4) / n
  assert np.abs(first - 0.25).max() < 4 * math.sqrt(0.25 * 0.75 / n)


def _torchvision_crop_boxes(rng, num, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """[num, 4] (i, j, h, w): torchvision's RandomResizedCrop.get_params, line for line, in NumPy."""
  boxes = []
  for _ in range(num):
    for _ in range(10):
      target_area = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
      if 0 < w <= width and 0 < h <= height:
        boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))  # high exclusive
        break
    else:  # a centre crop, its ratio clamped
      in_ratio = width / height
      if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
      elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
      else:
        w, h = width, height
      boxes.append(((height - h) // 2, (width - w) // 2, h, w))
  return np.asarray(boxes, np.float64)


def _box_frequencies(boxes):
  keys, counts = np.unique(boxes, axis=0, return_counts=True)
  return {tuple(k): c / len(boxes) for k, c in zip(keys, counts)}


# (16, 16): 6% of boxes span the whole height, 6% the whole width; (4, 40): over a third of
# the draws find no box in 10 tries and fall back to the centre crop.
@pytest.mark.parametrize("height,width", [(16, 16), (12, 20), (4, 40)])
def test_crop_boxes_on_both_backends_follow_torchvisions_get_params(height, width):
  n = 20000
  want = _torchvision_crop_boxes(np.random.default_rng(0), n, height, width)
  boxes = {"device": np.asarray(jax.device_get(augment_jax.sample_params(jax.random.PRNGKey(0), n, height, width,
                                                                          CFG)["crop"]), np.float64),
           "tf": augment.sample_params(tf.constant([0, 1], tf.int64), n, height, width, CFG)["crop"].numpy()}
  at_end = lambda start, size, full: np.mean(start[size < full] == (full - size)[size < full])
  centred = lambda start, size, full: np.mean(start - (full - size) / 2)
  for backend, got in boxes.items():
    # The sizes: total variation distance to torchvision's (h, w) distribution
    # (two NumPy draws of this size differ by 0.036 at 16 x 16, 0.024 at 12 x 20, 0.005 at 4 x 40).
    sizes, want_sizes = _box_frequencies(got[:, 2:]), _box_frequencies(want[:, 2:])
    distance = 0.5 * sum(abs(sizes.get(k, 0) - want_sizes.get(k, 0)) for k in set(sizes) | set(want_sizes))
    assert distance < 0.06, (backend, distance)
    # The offsets, uniform over 0..H-h inclusive: a box ends on the last row or
    # column as often as torchvision's do, and offsets centre where its do
    # (randint(0, H - h) exclusive would never end there and centre 0.5 lower).
    for axis, full in ((0, height), (1, width)):
      start, size = got[:, axis], got[:, axis + 2]
      # Boxes as tall (wide) as the image are allowed, as often as torchvision's.
      assert abs(np.mean(size == full) - np.mean(want[:, axis + 2] == full)) < 0.015, (backend, axis)
      assert np.all(start >= 0) and np.all(start + size <= full) and np.all(start == np.floor(start)), backend
      want_start, want_size = want[:, axis], want[:, axis + 2]
      assert abs(at_end(start, size, full) - at_end(want_start, want_size, full)) < 0.03, (backend, axis)
      assert abs(centred(start, size, full) - centred(want_start, want_size, full)) < 0.15, (backend, axis)


def test_device_views_share_parameters_within_chunks_and_repeat_per_key():
  images = np.repeat(_images(1, 16), 8, axis=0)  # identical images: views differ only by parameters
  views = jax.jit(lambda x, k: augment_jax.pretraining_views(x, k, CFG, num_chunks=2))(
      jnp.asarray(images), jax.random.PRNGKey(5))
  e1 = np.asarray(views["e1"])
  np.testing.assert_array_equal(e1[:4], np.broadcast_to(e1[:1], e1[:4].shape))  # one chunk, one augmentation
  assert np.abs(e1[0] - e1[4]).max() > 1e-3  # the other chunk drew another
  x1 = np.asarray(views["x1"])
  assert min(np.abs(x1[0] - x1[i]).max() for i in range(1, 8)) > 1e-3  # per image
  again = augment_jax.pretraining_views(jnp.asarray(images), jax.random.PRNGKey(5), CFG, num_chunks=2)
  np.testing.assert_allclose(np.asarray(again["e2"]), np.asarray(views["e2"]), atol=1e-5)
  # The views are made in one interleaved apply; each must be what applying
  # its own parameters (view v drawn from fold_in(key, v)) to the batch gives.
  params = augment_jax.view_params(jax.random.PRNGKey(5), 8, 16, 16, CFG, num_chunks=2)
  # view_params against its contract, drawn here: view v from fold_in(key, v), x1 and
  # x2 one set per image, e1 and e2 one set per chunk repeated over its 4 images.
  for v, sets in enumerate((8, 8, 2, 2)):
    drawn = augment_jax.sample_params(jax.random.fold_in(jax.random.PRNGKey(5), v), sets, 16, 16, CFG)
    for k in drawn:
      np.testing.assert_array_equal(np.asarray(params[v][k]), np.repeat(np.asarray(drawn[k]), 8 // sets, axis=0),
                                    err_msg=f"view {v} {k}")
  for v, name in enumerate(("x1", "x2", "e1", "e2")):
    alone = jax.jit(augment_jax.apply, static_argnums=2)(jnp.asarray(images), params[v], CFG)
    np.testing.assert_allclose(np.asarray(views[name]), np.asarray(alone), atol=1e-5, err_msg=name)
  assert set(augment_jax.pretraining_views(jnp.asarray(images), jax.random.PRNGKey(5), CFG, num_chunks=2,
                                           with_equivariance=False)) == {"x1", "x2"}


def test_device_equivariance_views_can_skip_the_crop():
  cfg = dataclasses.replace(CFG, equiv_crop=False)
  params = augment_jax.view_params(jax.random.PRNGKey(2), 8, 16, 12, cfg, num_chunks=2)
  for v in (2, 3):  # e1, e2: the whole image
    np.testing.assert_array_equal(np.asarray(params[v]["crop"]), np.tile([0, 0, 16, 12], (8, 1)))
  for v in (0, 1):  # x1, x2 keep RandomResizedCrop
    assert (np.asarray(params[v]["crop"])[:, 2:] < [16, 12]).any(axis=1).mean() > 0.5


def test_crop_flip_is_apply_without_the_photometric_ops():
  # MoCo's lincls views (evaluate.lincls_probe): crop, flip and normalise only,
  # whatever the parameters' colour draws, against the tf.data backend's apply
  # with every photometric op switched off.
  n = 16
  params = jax.device_get(augment_jax.sample_params(jax.random.PRNGKey(4), n, 20, 20, CFG))
  assert 0 < params["flip"].sum() < n and params["jitter"].any() and params["blur"].any()
  plain = dict(params, jitter=np.zeros(n, bool), grayscale=np.zeros(n, bool), blur=np.zeros(n, bool))
  images = _images(n, 20, seed=3)
  want = augment.apply(tf.constant(images), {k: tf.constant(np.asarray(v)) for k, v in plain.items()}, CFG).numpy()
  got = np.asarray(jax.jit(augment_jax.crop_flip, static_argnums=2)(jnp.asarray(images), params, CFG))
  np.testing.assert_allclose(got, want, atol=2e-4)


def test_device_chunks_can_share_augmentation_pairs_in_groups_of_the_sub_batch():
  # 16 identical images, 8 chunks, e-views for 8 of them (one per chunk), 2 pairs:
  # chunks 0-3 share one pair, chunks 4-7 the other.
  images = jnp.asarray(np.repeat(_images(1, 16), 16, axis=0))
  views = jax.jit(lambda x, k: augment_jax.pretraining_views(x, k, CFG, num_chunks=8, equiv_batch=8, num_pairs=2))(
      images, jax.random.PRNGKey(3))
  for name in ("e1", "e2"):
    e = np.asarray(views[name])
    for group in (e[:4], e[4:]):
      np.testing.assert_allclose(group, np.broadcast_to(group[:1], group.shape), atol=1e-5)
    assert np.abs(e[0] - e[4]).max() > 1e-2


def test_an_equivariance_sub_batch_is_the_full_batchs_views_at_its_rows_and_stays_on_its_devices():
  # 16 images, 8 chunks, e1/e2 for 8 of them: rows 0, 2, 4, ... (the first of each block of 2),
  # with the chunk parameters the whole batch's views of those rows have.
  images = jnp.asarray(_images(16, 16))
  rows = config_lib.equivariance_rows(16, 8, 8)
  assert rows.tolist() == list(range(0, 16, 2))
  make = lambda equiv_batch: jax.jit(lambda x, k: augment_jax.pretraining_views(
      x, k, CFG, num_chunks=8, equiv_batch=equiv_batch))
  full = make(None)(images, jax.random.PRNGKey(7))
  # Sharded over the 8 devices as the train step holds the batch: each device's
  # chunk comes out on that device, and the values do not change.
  sharded = jax.device_put(images, NamedSharding(train.make_mesh(), P("data")))
  sub = make(8)(sharded, jax.random.PRNGKey(7))
  for name in ("x1", "x2"):
    np.testing.assert_allclose(np.asarray(sub[name]), np.asarray(full[name]), atol=1e-5, err_msg=name)
  for name in ("e1", "e2"):
    assert sub[name].shape == (8, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(sub[name]), np.asarray(full[name])[rows], atol=1e-5, err_msg=name)
    assert [s.index[0] for s in sub[name].addressable_shards] == [slice(i, i + 1) for i in range(8)]
    assert [s.device for s in sub[name].addressable_shards] == [s.device for s in sharded.addressable_shards]
