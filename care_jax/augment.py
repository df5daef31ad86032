"""SimCLR augmentations as sample(parameters) + apply(images, parameters), in TF.

Splitting sampling from application is what CARE needs: the InfoNCE views x1, x2
draw parameters per image, while the equivariance views e1, e2 draw ONE
parameter set per chunk and repeat it over the chunk's n images; both then go
through the same `apply`. Everything is vectorised over the batch (one
crop_and_resize with per-image boxes, the flip folded into them, then the
colour ops, per-image blur and normalisation as XLA-compiled batched functions)
and random draws are stateless, seeded from (seed, step, view), so the same
seed and step always give the same views.

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

import functools
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


def random_resized_crop(image, seed, size: int, cfg: AugmentConfig, flip=None):
  """One image of any shape (uint8 [H, W, 3]) -> float32 [size, size, 3] in [0, 1] under a
  RandomResizedCrop drawn from `seed` on its own size: the streaming path's first step,
  before images of different sizes can be batched. `flip` (scalar bool) mirrors it, free
  in crop_resize."""
  shape = tf.shape(image)
  box = _sample_crop_boxes(seed, 1, shape[0], shape[1], cfg, True)[0]
  return crop_resize(tf.cast(image, tf.float32)[None] / 255.0, box[None], size,
                     flip=None if flip is None else flip[None], antialias=cfg.antialias)[0]


def resize_whole(image, size: int, antialias: bool = False):
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]: the full-image box, bilinear."""
  shape = tf.shape(image)
  box = tf.stack([0.0, 0.0, tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)])
  return crop_resize(tf.cast(image, tf.float32)[None] / 255.0, box[None], size, antialias=antialias)[0]


def params_for_rows(params, rows, rows_per_set: int = 1):
  """The parameter sets of global batch rows `rows` ([R] int): row r gets set r // rows_per_set,
  so per-image sets are sliced (rows_per_set 1) and chunk sets repeated over their images."""
  index = rows if rows_per_set == 1 else rows // rows_per_set
  return {k: tf.gather(v, index) for k, v in params.items()}


# ----------------------------------------------------------------------- applying

def _grey(x):
  """ITU-R 601-2 luma [B, H, W, 1]."""
  return tf.reduce_sum(x * tf.constant(_LUMA, x.dtype), axis=-1, keepdims=True)


def _blend(a, b, f):
  # torchvision's _blend: clamp(f a + (1 - f) b) to [0, 1].
  f = f[:, None, None, None]
  return tf.clip_by_value(f * a + (1.0 - f) * b, 0.0, 1.0)


def _adjust_hue(x, delta):
  hsv = tf.image.rgb_to_hsv(x)
  h = tf.math.floormod(hsv[..., 0] + delta[:, None, None], 1.0)
  return tf.image.hsv_to_rgb(tf.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def _brightness(x, f):
  return tf.clip_by_value(f[:, None, None, None] * x, 0.0, 1.0)


def _contrast(x, f):
  return _blend(x, tf.reduce_mean(_grey(x), axis=[1, 2, 3], keepdims=True), f)


def _saturation(x, f):
  return _blend(x, _grey(x), f)


_JITTER_FNS = ((_brightness, "brightness"), (_contrast, "contrast"),
               (_saturation, "saturation"), (_adjust_hue, "hue"))


def _jitter_position(x, op, p, input_scale):
  """One of the 4 positions of colour jitter: image b gets op[b] (0-3, 4 = none).

  Every op is evaluated on the whole batch and each image keeps its own: under
  XLA one fused loop (the hue round trip dominates). Each position is its own
  XLA call: fused into one, XLA re-evaluates earlier positions inside later ones
  (35 ms against 13 ms for 256 images at 32x32). `input_scale` maps the crop's
  output to [0, 1] in the first call (1/255 for uint8 sources) and is 1 after.
  """
  x = x * input_scale
  out = x
  for k, (fn, name) in enumerate(_JITTER_FNS):
    out = tf.where(op[:, None, None, None] == k, fn(x, p[name]), out)
  return out


def _gaussian_blur(x, sigma, kernel_size: int, size: int):
  """Per-image separable Gaussian blur of [B, size, size, C], reflect padding, as torchvision's:
  k shifted taps per axis (XLA fuses them; a depthwise conv with B*C groups compiles to a slow loop)."""
  half = (kernel_size - 1) / 2
  t = tf.linspace(-half, half, kernel_size)
  k = tf.exp(-0.5 * tf.square(t[None, :] / sigma[:, None]))
  k = k / tf.reduce_sum(k, axis=1, keepdims=True)  # [B, k]
  pad = kernel_size // 2
  y = tf.pad(x, [[0, 0], [pad, pad], [0, 0], [0, 0]], mode="REFLECT")
  x = sum(k[:, m, None, None, None] * y[:, m:m + size] for m in range(kernel_size))
  y = tf.pad(x, [[0, 0], [0, 0], [pad, pad], [0, 0]], mode="REFLECT")
  return sum(k[:, m, None, None, None] * y[:, :, m:m + size] for m in range(kernel_size))


_JITTER_KEYS = tuple(name for _, name in _JITTER_FNS)


@functools.lru_cache(maxsize=None)
def _photometric_fn(input_scale: float, size: int, kernel_size: int, mean: tuple, std: tuple):
  """XLA-compiled colour jitter (one position per call) and grayscale + blur + normalisation.

  TF runs these ops one kernel at a time, each a full pass over the batch with
  its own allocation (and slow broadcasts over the 3-channel axis); XLA fuses
  them into a few loops: apply() on 256 images at 32x32 took 101 ms op by op,
  13 ms now (README, Measured). crop_and_resize has no XLA kernel and runs before.
  """
  scale = 1.0 / np.asarray(std, np.float32)
  shift = -np.asarray(mean, np.float32) * scale
  # autograph=False: the bodies branch over Python values only, and AutoGraph's
  # source rewrite of them was most of building a pipeline (input_pipeline._graph_only).
  jitter_position = tf.function(_jitter_position, jit_compile=True, reduce_retracing=True, autograph=False)

  @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
  def finish(x, grayscale, blur, blur_sigma):
    x = tf.where(grayscale[:, None, None, None], _grey(x), x)
    x = tf.where(blur[:, None, None, None], _gaussian_blur(x, blur_sigma, kernel_size, size), x)
    return x * scale + shift

  def photometric(x, p):
    jitter = {k: p[k] for k in _JITTER_KEYS}
    for position in range(_JITTER_OPS):
      op = tf.where(p["jitter"], p["jitter_order"][:, position], _JITTER_OPS)
      x = jitter_position(x, op, jitter, tf.constant(input_scale if position == 0 else 1.0))
    return finish(x, p["grayscale"], p["blur"], p["blur_sigma"])

  return photometric


def _antialiased_resize_matrix(start, length, in_size, out_size: int):
  """[B, out, in]: PIL's bilinear resize of the crop, as augment_jax._antialiased_resize_matrix."""
  scale = length / out_size
  centre = start[:, None] + (tf.range(out_size, dtype=tf.float32) + 0.5)[None, :] * scale[:, None]
  pixel = tf.cast(tf.range(in_size), tf.float32)[None, None, :] + 0.5
  weight = tf.maximum(0.0, 1.0 - tf.abs(pixel - centre[..., None]) / tf.maximum(scale, 1.0)[:, None, None])
  inside = tf.logical_and(pixel >= start[:, None, None], pixel < (start + length)[:, None, None])
  weight = tf.where(inside, weight, 0.0)
  return weight / tf.reduce_sum(weight, axis=-1, keepdims=True)


def crop_resize(x, crop, size: int, flip=None, antialias: bool = False):
  """[B, H, W, C] -> float32 [B, size, size, C]: pixel boxes (i, j, h, w) resampled bilinearly
  (antialias: as PIL / torchvision's resized_crop, see AugmentConfig.antialias).

  `flip` [B] bool mirrors those images left-right for free: crop_and_resize
  samples a box whose x1 > x2 from right to left; the antialiased path reverses
  the column weights. uint8 input gives 0..255.
  """
  shape = tf.shape(x)
  if antialias:
    i, j, h, w = tf.unstack(tf.cast(crop, tf.float32), axis=1)
    rows = _antialiased_resize_matrix(i, h, shape[1], size)
    cols = _antialiased_resize_matrix(j, w, shape[2], size)
    if flip is not None:
      cols = tf.where(flip[:, None, None], tf.reverse(cols, axis=[1]), cols)
    return tf.einsum("bsh,bhwc,btw->bstc", rows, tf.cast(x, tf.float32), cols)
  h1 = tf.cast(shape[1] - 1, tf.float32)
  w1 = tf.cast(shape[2] - 1, tf.float32)
  i, j, h, w = tf.unstack(crop, axis=1)
  left, right = j / w1, (j + w - 1) / w1
  if flip is not None:
    left, right = tf.where(flip, right, left), tf.where(flip, left, right)
  boxes = tf.stack([i / h1, left, (i + h - 1) / h1, right], axis=1)
  return tf.image.crop_and_resize(x, boxes, tf.range(shape[0]), [size, size], method="bilinear")


def apply(images, params, cfg: AugmentConfig):
  """images uint8 [B, H, W, 3] (or float in [0, 1]) -> normalised float32 [B, S, S, 3] under `params`."""
  if images.dtype != tf.uint8:
    images = tf.cast(images, tf.float32)
  x = crop_resize(images, params["crop"], cfg.image_size, flip=params["flip"], antialias=cfg.antialias)
  photometric = _photometric_fn(1.0 / 255.0 if images.dtype == tf.uint8 else 1.0, cfg.image_size,
                                 cfg.blur_kernel_size, tuple(cfg.mean), tuple(cfg.std))
  return photometric(x, params)


def view_seed(seed: int, step, view: int):
  """The stateless seed of one view of one step: (seed, step) folded with view."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, view)


def view_params(seed: int, step, height, width, cfg: AugmentConfig, *, global_batch: int, num_chunks: int,
                rows, equiv_rows=None, num_pairs: int | None = None, with_equivariance: bool = True) -> dict:
  """{view name: its parameters for global batch rows `rows`} of one step, view v drawn from
  view_seed(seed, step, v): x1, x2 one set per image of the global batch, e1, e2 one set
  per chunk of global_batch / num_chunks consecutive images (per num_pairs groups of
  consecutive chunks where given), for `equiv_rows` instead where only those rows get
  them (config_lib.local_equivariance_rows)."""
  params = {name: params_for_rows(sample_params(view_seed(seed, step, view), global_batch, height, width, cfg), rows)
            for name, view in (("x1", 0), ("x2", 1))}
  if with_equivariance:
    pairs = num_pairs or num_chunks
    for name, view in (("e1", 2), ("e2", 3)):
      pair_params = sample_params(view_seed(seed, step, view), pairs, height, width, cfg, crop=cfg.equiv_crop)
      params[name] = params_for_rows(pair_params, rows if equiv_rows is None else equiv_rows, global_batch // pairs)
  return params


def process_rows(images, rows, offset):
  """The images of global batch rows `rows` from a process's rows starting at `offset`; all when rows is None."""
  return images if rows is None else tf.gather(images, rows - offset)


def pretraining_views(images, seed: int, step, cfg: AugmentConfig, *, global_batch: int,
                      num_chunks: int, offset, equiv_rows=None, num_pairs: int | None = None,
                      with_equivariance: bool = True):
  """The four views of this process's rows [offset, offset + B_local) of a global batch.

  x1, x2: per-image parameters; e1, e2: one parameter set per chunk of
  n = global_batch / num_chunks images (or per group of chunks: num_pairs sets),
  made for the global rows `equiv_rows` alone where given
  (config_lib.local_equivariance_rows; None: every row). Returns a dict of float32 tensors.
  """
  shape = tf.shape(images)
  params = view_params(seed, step, shape[1], shape[2], cfg, global_batch=global_batch, num_chunks=num_chunks,
                       rows=offset + tf.range(shape[0]), equiv_rows=equiv_rows, num_pairs=num_pairs,
                       with_equivariance=with_equivariance)
  sources = {"x1": images, "x2": images}
  sources["e1"] = sources["e2"] = process_rows(images, equiv_rows, offset)
  # One apply per view, not one of the stacked views: tf.data runs the four
  # independent applies side by side (4.7k against 4.1k images/s on 2 cores,
  # experiments/bench_input.py).
  return {name: apply(sources[name], p, cfg) for name, p in params.items()}
