"""SimCLR augmentations as sample(parameters) + apply(images, parameters), in TF.

Splitting sampling from application is what CARE needs: the InfoNCE views x1, x2
draw parameters per image, while the equivariance views e1, e2 draw ONE
parameter set per chunk and repeat it over the chunk's n images; both then go
through the same `apply`. Everything is vectorised over the batch (one
crop_and_resize with per-image boxes, batched colour ops, one depthwise conv
for per-image blur kernels) and random draws are stateless, seeded from
(seed, step, view), so the same seed and step always give the same views.

Parameters are always drawn for the GLOBAL batch and then sliced to this
process's rows, so a process's views do not depend on how many processes share
the batch (they are tiny: a few floats per image).

The reference release's torchvision pipeline, reproduced here:
RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)), horizontal flip
p=0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 in a random order per image,
grayscale p=0.2, Gaussian blur p=0.5 with sigma in [0.1, 2] and an odd kernel
of ~10% of the side (reflect padding), then per-channel normalisation.
"""

from __future__ import annotations

import math

import numpy as np

import tensorflow as tf

from care_jax.augment_config import AugmentConfig  # noqa: F401 (re-exported: augment.AugmentConfig)

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes.
_JITTER_OPS = 4  # brightness, contrast, saturation, hue


def _uniform(seed, shape, lo, hi):
  return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def _sub_seeds(seed, count):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=count), num=count)


# ----------------------------------------------------------------------- sampling

def _sample_crop_boxes(seed, num, height, width, cfg: AugmentConfig, crop: bool):
  """RandomResizedCrop's box per image as [num, 4] (i, j, h, w) in pixels."""
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  if not crop:
    return tf.tile(tf.stack([0.0, 0.0, h_f, w_f])[None], [num, 1])
  s_area, s_ratio, s_i, s_j = _sub_seeds(seed, 4)
  shape = [num, _CROP_ATTEMPTS]
  area = h_f * w_f * _uniform(s_area, shape, *cfg.crop_scale)
  log_r = _uniform(s_ratio, shape, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
  ratio = tf.exp(log_r)
  w = tf.round(tf.sqrt(area * ratio))
  h = tf.round(tf.sqrt(area / ratio))
  valid = (w > 0) & (w <= w_f) & (h > 0) & (h <= h_f)
  # torchvision: i = randint(0, H - h) inclusive.
  i = tf.floor(_uniform(s_i, shape, 0.0, 1.0) * (h_f - h + 1))
  j = tf.floor(_uniform(s_j, shape, 0.0, 1.0) * (w_f - w + 1))
  first = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
  pick = lambda t: tf.gather(t, first, batch_dims=1)
  # Fallback when no attempt fits: a centre crop with the ratio clamped.
  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio < cfg.crop_ratio[0], w_f,
                  tf.where(in_ratio > cfg.crop_ratio[1], tf.round(h_f * cfg.crop_ratio[1]), w_f))
  fb_h = tf.where(in_ratio < cfg.crop_ratio[0], tf.round(w_f / cfg.crop_ratio[0]), h_f)
  fallback = tf.stack([tf.floor((h_f - fb_h) / 2), tf.floor((w_f - fb_w) / 2), fb_h, fb_w])
  chosen = tf.stack([pick(i), pick(j), pick(h), pick(w)], axis=1)
  any_valid = tf.reduce_any(valid, axis=1)[:, None]
  return tf.where(any_valid, chosen, fallback[None])


def sample_params(seed, num: int, height: int, width: int, cfg: AugmentConfig, crop: bool = True):
  """Draws `num` independent parameter sets from a stateless seed ([2] int)."""
  seeds = _sub_seeds(tf.convert_to_tensor(seed), 11)
  bern = lambda s, p: _uniform(s, [num], 0.0, 1.0) < p
  factor = lambda s, amount: _uniform(s, [num], max(0.0, 1.0 - amount), 1.0 + amount)
  # A random permutation of the 4 jitter ops per image: argsort of noise.
  order = tf.argsort(_uniform(seeds[6], [num, _JITTER_OPS], 0.0, 1.0), axis=1, stable=True)
  return {
      "crop": _sample_crop_boxes(seeds[0], num, height, width, cfg, crop),
      "flip": bern(seeds[1], cfg.flip_prob),
      "jitter": bern(seeds[2], cfg.jitter_prob),
      "brightness": factor(seeds[3], cfg.brightness),
      "contrast": factor(seeds[4], cfg.contrast),
      "saturation": factor(seeds[5], cfg.saturation),
      "jitter_order": tf.cast(order, tf.int32),
      "hue": _uniform(seeds[7], [num], -cfg.hue, cfg.hue),
      "grayscale": bern(seeds[8], cfg.grayscale_prob),
      "blur": bern(seeds[9], cfg.blur_prob),
      "blur_sigma": _uniform(seeds[10], [num], *cfg.blur_sigma),
  }


def random_resized_crop(image, seed, size: int, cfg: AugmentConfig):
  """One image of any shape (uint8 [H, W, 3]) -> float32 [size, size, 3] in [0, 1] under a
  RandomResizedCrop drawn from `seed` on its own size: the streaming path's first step,
  before images of different sizes can be batched."""
  shape = tf.shape(image)
  box = _sample_crop_boxes(seed, 1, shape[0], shape[1], cfg, True)[0]
  return _crop_resize(tf.cast(image, tf.float32)[None] / 255.0, box[None], size)[0]


def resize_whole(image, size: int):
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]: the full-image box, bilinear."""
  shape = tf.shape(image)
  box = tf.stack([0.0, 0.0, tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)])
  return _crop_resize(tf.cast(image, tf.float32)[None] / 255.0, box[None], size)[0]


def repeat_params(params, n: int):
  """Each parameter set repeated over n consecutive images (one chunk each)."""
  return {k: tf.repeat(v, n, axis=0) for k, v in params.items()}


def slice_params(params, start, size):
  return {k: v[start:start + size] for k, v in params.items()}


# ----------------------------------------------------------------------- applying

def _colour_matrix(x, matrix):
  """Per-image linear colour map out[b, ..., c] = sum_k x[b, ..., k] matrix[b, k, c].

  As one batched [HW, 3] x [3, 3] product: a single pass over the pixels,
  where grey/blend formulas take three to five elementwise passes (2-4x faster).
  """
  shape = tf.shape(x)
  return tf.reshape(tf.matmul(tf.reshape(x, [shape[0], -1, 3]), matrix), shape)


def _luma_blend_matrix(f):
  """[B, 3, 3]: f * identity + (1 - f) * (every output channel = luma)."""
  luma = tf.tile(tf.constant(_LUMA, tf.float32)[:, None], [1, 3])
  return f[:, None, None] * tf.eye(3) + (1.0 - f)[:, None, None] * luma


def _adjust_hue(x, delta):
  hsv = tf.image.rgb_to_hsv(x)
  h = tf.math.floormod(hsv[..., 0] + delta[:, None, None], 1.0)
  return tf.image.hsv_to_rgb(tf.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def _brightness(x, f):
  # torchvision's _blend(x, black, f) = clamp(f x + (1 - f) 0), and likewise below.
  return tf.clip_by_value(f[:, None, None, None] * x, 0.0, 1.0)


def _contrast(x, f):
  shape = tf.shape(x)
  grey = tf.matmul(tf.reshape(x, [shape[0], -1, 3]), tf.constant(_LUMA, tf.float32)[:, None])
  mean = tf.reduce_mean(grey, axis=[1, 2])  # [B]
  return tf.clip_by_value(f[:, None, None, None] * x + ((1.0 - f) * mean)[:, None, None, None], 0.0, 1.0)


def _saturation(x, f):
  return tf.clip_by_value(_colour_matrix(x, _luma_blend_matrix(f)), 0.0, 1.0)


_JITTER_FNS = ((_brightness, "brightness"), (_contrast, "contrast"),
               (_saturation, "saturation"), (_adjust_hue, "hue"))


def _color_jitter(x, p):
  """The 4 ops in each image's own order (torchvision draws a permutation per call).

  At each of the 4 positions the batch is partitioned by the op each image
  applies there (a fifth group: images not jittered), each op runs on its
  group only, and the groups are stitched back: one op's worth of work per
  position instead of all four (the hue op's rgb<->hsv dominates).
  """
  batch = tf.shape(x)[0]
  rows = tf.range(batch)
  for position in range(_JITTER_OPS):
    group = tf.where(p["jitter"], p["jitter_order"][:, position], _JITTER_OPS)
    parts = tf.dynamic_partition(x, group, _JITTER_OPS + 1)
    index = tf.dynamic_partition(rows, group, _JITTER_OPS + 1)
    outs = [fn(parts[k], tf.dynamic_partition(p[name], group, _JITTER_OPS + 1)[k])
            for k, (fn, name) in enumerate(_JITTER_FNS)]
    x = tf.dynamic_stitch(index, outs + [parts[_JITTER_OPS]])
    x = tf.ensure_shape(x, [None, None, None, 3])
  return x


def _gaussian_blur(x, sigma, kernel_size):
  """Per-image separable Gaussian blur, reflect padding, as torchvision's."""
  b, h, w, c = tf.unstack(tf.shape(x))
  half = (kernel_size - 1) / 2
  t = tf.linspace(-half, half, kernel_size)
  k = tf.exp(-0.5 * tf.square(t[None, :] / sigma[:, None]))
  k = k / tf.reduce_sum(k, axis=1, keepdims=True)  # [B, k]
  # Images as channels of one image: one depthwise conv applies B kernels.
  per_channel = tf.transpose(tf.repeat(k, c, axis=0))  # [k, B*C]
  y = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, b * c])
  pad = kernel_size // 2
  y = tf.pad(y, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  y = tf.nn.depthwise_conv2d(y, tf.reshape(per_channel, [kernel_size, 1, -1, 1]), [1, 1, 1, 1], "VALID")
  y = tf.nn.depthwise_conv2d(y, tf.reshape(per_channel, [1, kernel_size, -1, 1]), [1, 1, 1, 1], "VALID")
  return tf.transpose(tf.reshape(y, [h, w, b, c]), [2, 0, 1, 3])


def _crop_resize(x, crop, size: int):
  """float [B, H, W, C] -> [B, size, size, C]: pixel boxes (i, j, h, w) resampled bilinearly."""
  shape = tf.shape(x)
  h1 = tf.cast(shape[1] - 1, tf.float32)
  w1 = tf.cast(shape[2] - 1, tf.float32)
  i, j, h, w = tf.unstack(crop, axis=1)
  boxes = tf.stack([i / h1, j / w1, (i + h - 1) / h1, (j + w - 1) / w1], axis=1)
  return tf.image.crop_and_resize(x, boxes, tf.range(shape[0]), [size, size], method="bilinear")


def apply(images, params, cfg: AugmentConfig):
  """images uint8 [B, H, W, 3] (or float in [0, 1]) -> normalised float32 [B, S, S, 3] under `params`."""
  x = tf.cast(images, tf.float32) / 255.0 if images.dtype == tf.uint8 else tf.cast(images, tf.float32)
  x = _crop_resize(x, params["crop"], cfg.image_size)
  x = tf.where(params["flip"][:, None, None, None], tf.reverse(x, axis=[2]), x)
  x = _color_jitter(x, params)
  x = _colour_matrix(x, _luma_blend_matrix(1.0 - tf.cast(params["grayscale"], tf.float32)))  # grey or identity
  x = tf.where(params["blur"][:, None, None, None],
               _gaussian_blur(x, params["blur_sigma"], cfg.blur_kernel_size), x)
  return normalize(x, cfg)


def normalize(x, cfg: AugmentConfig):
  scale = 1.0 / np.asarray(cfg.std, np.float32)  # one multiply-add pass, not subtract then divide
  return x * tf.constant(scale) + tf.constant(-np.asarray(cfg.mean, np.float32) * scale)


def view_seed(seed: int, step, view: int):
  """The stateless seed of one view of one step: (seed, step) folded with view."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, view)


def pretraining_views(images, seed: int, step, cfg: AugmentConfig, *, global_batch: int,
                      num_chunks: int, offset, with_equivariance: bool = True):
  """The four views of this process's rows [offset, offset + B_local) of a global batch.

  x1, x2: per-image parameters; e1, e2: one parameter set per chunk of
  n = global_batch / num_chunks images. Returns a dict of float32 tensors.
  """
  shape = tf.shape(images)
  local = shape[0]
  h, w = shape[1], shape[2]
  out = {}
  for name, view in (("x1", 0), ("x2", 1)):
    p = sample_params(view_seed(seed, step, view), global_batch, h, w, cfg)
    out[name] = apply(images, slice_params(p, offset, local), cfg)
  if with_equivariance:
    n = global_batch // num_chunks
    for name, view in (("e1", 2), ("e2", 3)):
      p = sample_params(view_seed(seed, step, view), num_chunks, h, w, cfg, crop=cfg.equiv_crop)
      out[name] = apply(images, slice_params(repeat_params(p, n), offset, local), cfg)
  return out
