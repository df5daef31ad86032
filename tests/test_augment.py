"""augment.py: parameter semantics, chunk sharing, determinism, eager == tf.data."""
import math

import numpy as np
import pytest
import tensorflow as tf

from care_jax import augment

CFG = augment.AugmentConfig(image_size=16)


def _images(n, seed=0, size=16):
  return tf.constant(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _identity_params(n, size):
  z = tf.zeros([n], tf.bool)
  return {"crop": tf.tile(tf.constant([[0.0, 0.0, size, size]]), [n, 1]), "flip": z, "jitter": z,
          "brightness": tf.ones([n]), "contrast": tf.ones([n]), "saturation": tf.ones([n]),
          "jitter_order": tf.tile(tf.range(4)[None], [n, 1]), "hue": tf.zeros([n]), "grayscale": z,
          "blur": z, "blur_sigma": tf.ones([n])}


def test_identity_parameters_only_normalise():
  x = _images(4)
  out = augment.apply(x, _identity_params(4, 16), CFG)
  want = (x.numpy() / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(out.numpy(), want, atol=1e-5)


def test_flip_grayscale_and_single_ops():
  x = _images(3)
  p = _identity_params(3, 16)
  p["flip"] = tf.constant([True, False, False])
  p["grayscale"] = tf.constant([False, True, False])
  out = augment.apply(x, p, CFG).numpy() * 0.5 + 0.5
  np.testing.assert_allclose(out[0], x.numpy()[0, :, ::-1] / 255.0, atol=1e-5)
  luma = (x.numpy()[1] / 255.0) @ np.array([0.299, 0.587, 0.114])
  for c in range(3):
    np.testing.assert_allclose(out[1, ..., c], luma, atol=1e-5)
  # Hue alone against TensorFlow's own adjust_hue (scalar delta per image).
  p = _identity_params(2, 16)
  p["jitter"] = tf.constant([True, True])
  p["hue"] = tf.constant([0.07, -0.05])
  p["jitter_order"] = tf.constant([[3, 0, 1, 2], [0, 3, 1, 2]])
  out = augment.apply(x[:2], p, CFG).numpy() * 0.5 + 0.5
  for i, d in enumerate([0.07, -0.05]):
    want = tf.image.adjust_hue(tf.cast(x[i], tf.float32) / 255.0, d).numpy()
    np.testing.assert_allclose(out[i], want, atol=2e-3)


@pytest.mark.parametrize("size, kernel", [(16, 3), (64, 7)])
def test_blur_matches_numpy_reflect_gaussian(size, kernel):
  cfg = augment.AugmentConfig(image_size=size)
  assert cfg.blur_kernel_size == kernel
  x = _images(2, size=size)
  p = _identity_params(2, size)
  p["blur"] = tf.constant([True, True])
  p["blur_sigma"] = tf.constant([0.5, 1.7])
  out = augment.apply(x, p, cfg).numpy() * 0.5 + 0.5
  pad = kernel // 2
  for i, sigma in enumerate([0.5, 1.7]):
    t = np.arange(kernel) - (kernel - 1) / 2
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    img = np.pad(x.numpy()[i] / 255.0, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    rows = sum(w[a] * img[a:a + size] for a in range(kernel))
    want = sum(w[b] * rows[:, b:b + size] for b in range(kernel))
    np.testing.assert_allclose(out[i], want, atol=1e-5)


def test_uint8_and_unit_float_sources_give_the_same_views():
  # The streamed path hands apply() float images in [0, 1] (cropped per image), the in-memory one uint8.
  x = _images(8)
  p = augment.sample_params(tf.constant([7, 8], tf.int64), 8, 16, 16, CFG)
  from_uint8 = augment.apply(x, p, CFG).numpy()
  from_float = augment.apply(tf.cast(x, tf.float32) / 255.0, p, CFG).numpy()
  np.testing.assert_allclose(from_float, from_uint8, atol=1e-5)


def test_crop_boxes_follow_torchvision_rules():
  boxes = augment.sample_params(tf.constant([1, 2], tf.int64), 4000, 32, 32, CFG)["crop"].numpy()
  i, j, h, w = boxes.T
  assert np.all(i >= 0) and np.all(j >= 0) and np.all(i + h <= 32) and np.all(j + w <= 32)
  assert np.all(h >= 1) and np.all(w >= 1)
  area = h * w / 1024
  assert area.min() >= 0.06 and area.max() <= 1.0  # scale (0.08, 1) up to rounding
  ratio = w / h
  assert ratio.min() > 0.5 and ratio.max() < 2.0
  assert np.all(h == np.round(h)) and np.all(i == np.floor(i))
  # Offsets are spread over the whole allowed range.
  assert (i / np.maximum(32 - h, 1)).std() > 0.2


def test_sampled_probabilities():
  p = augment.sample_params(tf.constant([3, 4], tf.int64), 20000, 32, 32, CFG)
  for key, prob in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
    assert abs(p[key].numpy().mean() - prob) < 0.02, key
  orders = p["jitter_order"].numpy()
  assert np.all(np.sort(orders, axis=1) == np.arange(4))
  assert len({tuple(o) for o in orders}) == 24  # all permutations occur
  assert 0.6 <= p["brightness"].numpy().min() and p["brightness"].numpy().max() <= 1.4
  assert np.abs(p["hue"].numpy()).max() <= 0.1


def _views(images, step, global_batch=8, num_chunks=2, offset=0, seed=5, cfg=CFG):
  return augment.pretraining_views(images, seed, step, cfg, global_batch=global_batch,
                                   num_chunks=num_chunks, offset=offset)


def test_chunks_share_one_augmentation_and_images_do_not():
  same = tf.tile(_images(1), [8, 1, 1, 1])  # 8 copies of one image
  v = {k: t.numpy() for k, t in _views(same, 0).items()}
  for name in ("e1", "e2"):
    for chunk in (v[name][:4], v[name][4:]):
      for row in chunk[1:]:
        np.testing.assert_allclose(row, chunk[0], atol=1e-6)
    assert np.abs(v[name][0] - v[name][4]).max() > 1e-2  # chunks differ
  for name in ("x1", "x2"):
    diffs = [np.abs(v[name][0] - v[name][r]).max() for r in range(1, 8)]
    assert min(diffs) > 1e-3  # every image its own augmentation


def test_chunks_can_share_augmentation_pairs_in_groups():
  # equiv_augment_pairs: 4 chunks of 2, 2 pairs -> chunks 0, 1 share one pair and chunks 2, 3
  # the other; with one pair per chunk (the default) the draws are the default's.
  same = tf.tile(_images(1), [8, 1, 1, 1])
  grouped = augment.pretraining_views(same, 5, 0, CFG, global_batch=8, num_chunks=4, offset=0, num_pairs=2)
  per_chunk = augment.pretraining_views(same, 5, 0, CFG, global_batch=8, num_chunks=4, offset=0, num_pairs=4)
  default = augment.pretraining_views(same, 5, 0, CFG, global_batch=8, num_chunks=4, offset=0)
  for name in ("e1", "e2"):
    e = grouped[name].numpy()
    for group in (e[:4], e[4:]):
      np.testing.assert_allclose(group, np.broadcast_to(group[:1], group.shape), atol=1e-6)
    assert np.abs(e[0] - e[4]).max() > 1e-2
    np.testing.assert_array_equal(per_chunk[name].numpy(), default[name].numpy())
    assert np.abs(default[name].numpy()[0] - default[name].numpy()[2]).max() > 1e-2  # chunks 0 and 1 differ


def test_same_seed_and_step_same_views_and_process_slices_agree():
  x = _images(8)
  a, b, c = _views(x, 3), _views(x, 3), _views(x, 4)
  for k in a:
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert np.abs(a[k].numpy() - c[k].numpy()).max() > 1e-3
  # Two processes with 4 rows each see exactly the rows of the whole batch.
  halves = [_views(x[o:o + 4], 3, offset=o) for o in (0, 4)]
  for k in a:
    np.testing.assert_allclose(np.concatenate([h[k].numpy() for h in halves]), a[k].numpy(), atol=1e-6)


def test_each_view_is_a_separate_apply_of_its_own_parameters():
  # pretraining_views gathers each view's parameters for this process's rows:
  # each view must be what apply gives its images under ITS parameters, here
  # drawn for the global batch and laid out with NumPy (process 1 of 2: rows
  # 4..7 of a batch of 8 in 2 chunks of 4).
  x, step = _images(4, seed=1), 3
  views = _views(x, step, offset=4)
  for name, view, sets in (("x1", 0, 8), ("x2", 1, 8), ("e1", 2, 2), ("e2", 3, 2)):
    drawn = augment.sample_params(augment.view_seed(5, step, view), sets, 16, 16, CFG)
    set_of_row = np.arange(4, 8) // (8 // sets)
    own = {k: tf.constant(v.numpy()[set_of_row]) for k, v in drawn.items()}
    np.testing.assert_allclose(views[name].numpy(), augment.apply(x, own, CFG).numpy(), atol=1e-6, err_msg=name)


def test_equivariance_views_can_skip_the_crop():
  cfg = augment.AugmentConfig(image_size=16, equiv_crop=False)
  p = augment.sample_params(tf.constant([0, 1], tf.int64), 50, 16, 16, cfg, crop=False)
  np.testing.assert_array_equal(p["crop"].numpy(), np.tile([0, 0, 16, 16], (50, 1)))


def test_eager_and_tf_data_agree():
  x = _images(8)
  eager = _views(x, 2)
  ds = tf.data.Dataset.from_tensors(x).map(lambda im: _views(im, tf.constant(2, tf.int64)))
  graph = next(iter(ds))
  for k in eager:
    np.testing.assert_allclose(graph[k].numpy(), eager[k].numpy(), atol=1e-5)
