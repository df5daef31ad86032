"""The on-device augmentation backend: care_jax/augment.py's contract in jnp.

Same parameters (per image for x1/x2, one set per chunk repeated over its n
images for e1/e2), same apply semantics, but traced into the jitted train
step on uint8 batches already on the accelerator, so a run needs no tf.data
host pipeline (a CPU pipeline tops out at a few thousand images/s; one GPU
trains tens of thousands of views/s). augment.py stays the reference; a test
feeds one parameter set to both and compares the views.

Accelerator-shaped formulation: the two per-image spatial operations are
linear maps along rows and columns, so each is a pair of batched matrix
products instead of gathers:
  crop + resize (bilinear, tf.image.crop_and_resize's sampling grid):
      out = Wy x Wx^T with Wy [B, S, H] holding each output row's two taps;
  Gaussian blur (separable, reflect padding folded into the matrix):
      out = K x K^T with K [B, S, S].
Colour jitter keeps torchvision's per-image random order by evaluating the
four ops at each of the four positions and selecting per image (elementwise
work is cheap on an accelerator; no data-dependent shapes under jit).
Random draws use jax.random (a different stream from TF's: the DISTRIBUTIONS
match, the draws do not).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from care_jax import random_util
from care_jax.augment_config import AugmentConfig

_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10
_JITTER_OPS = 4


# ----------------------------------------------------------------------- sampling

# One parameter set's numbers are the columns of one uniform draw [num, _UNIFORMS]:
# XLA:CPU compiles every threefry draw on its own, and slowly. Sampling the four
# views' parameters with 14 draws per view compiled in 4.1-4.5 s on 2 cores (8
# devices, -O0); with one draw per view, in 0.7-1.0 s. The distributions are
# jax.random.uniform's: lo + (hi - lo) u.
_CROP_COLUMNS = 4 * _CROP_ATTEMPTS  # area, log aspect ratio, top, left: one column per attempt each
_FLIP, _JITTER, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE, _GRAYSCALE, _BLUR, _BLUR_SIGMA = range(
    _CROP_COLUMNS, _CROP_COLUMNS + 9)
_JITTER_ORDER = _CROP_COLUMNS + 9  # _JITTER_OPS columns, argsorted
_UNIFORMS = _JITTER_ORDER + _JITTER_OPS


def _between(u, lo, hi):
  return lo + (hi - lo) * u


def _sample_crop_boxes(u, height, width, cfg: AugmentConfig, crop: bool):
  """RandomResizedCrop's (i, j, h, w) per image from uniforms u [num, _CROP_COLUMNS], as augment.py:
  10 tries, then a centre crop."""
  h_f, w_f = float(height), float(width)
  if not crop:
    return jnp.tile(jnp.asarray([[0.0, 0.0, h_f, w_f]], jnp.float32), (u.shape[0], 1))
  u_area, u_ratio, u_i, u_j = (u[:, k * _CROP_ATTEMPTS:(k + 1) * _CROP_ATTEMPTS] for k in range(4))
  area = h_f * w_f * _between(u_area, *cfg.crop_scale)
  ratio = jnp.exp(_between(u_ratio, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
  w = jnp.round(jnp.sqrt(area * ratio))
  h = jnp.round(jnp.sqrt(area / ratio))
  valid = (w > 0) & (w <= w_f) & (h > 0) & (h <= h_f)
  i = jnp.floor(u_i * (h_f - h + 1))
  j = jnp.floor(u_j * (w_f - w + 1))
  first = jnp.argmax(valid, axis=1)
  pick = lambda t: jnp.take_along_axis(t, first[:, None], axis=1)[:, 0]
  in_ratio = w_f / h_f
  lo, hi = cfg.crop_ratio
  fb_w = w_f if in_ratio < lo else (round(h_f * hi) if in_ratio > hi else w_f)
  fb_h = round(w_f / lo) if in_ratio < lo else h_f
  fallback = jnp.asarray([math.floor((h_f - fb_h) / 2), math.floor((w_f - fb_w) / 2), fb_h, fb_w], jnp.float32)
  chosen = jnp.stack([pick(i), pick(j), pick(h), pick(w)], axis=1)
  return jnp.where(jnp.any(valid, axis=1)[:, None], chosen, fallback[None])


def sample_params(key, num: int, height: int, width: int, cfg: AugmentConfig, crop: bool = True) -> dict:
  """`num` independent parameter sets; the same keys and dtypes as augment.sample_params."""
  u = random_util.drawn_flat(jax.random.uniform, key, (num, _UNIFORMS))
  factor = lambda col, amount: _between(u[:, col], max(0.0, 1.0 - amount), 1.0 + amount)
  return {
      "crop": _sample_crop_boxes(u[:, :_CROP_COLUMNS], height, width, cfg, crop),
      "flip": u[:, _FLIP] < cfg.flip_prob,
      "jitter": u[:, _JITTER] < cfg.jitter_prob,
      "brightness": factor(_BRIGHTNESS, cfg.brightness),
      "contrast": factor(_CONTRAST, cfg.contrast),
      "saturation": factor(_SATURATION, cfg.saturation),
      "jitter_order": jnp.argsort(u[:, _JITTER_ORDER:], axis=1, stable=True).astype(jnp.int32),
      "hue": _between(u[:, _HUE], -cfg.hue, cfg.hue),
      "grayscale": u[:, _GRAYSCALE] < cfg.grayscale_prob,
      "blur": u[:, _BLUR] < cfg.blur_prob,
      "blur_sigma": _between(u[:, _BLUR_SIGMA], *cfg.blur_sigma),
  }


def repeat_params(params: dict, n: int) -> dict:
  return {k: jnp.repeat(v, n, axis=0) for k, v in params.items()}


# ----------------------------------------------------------------------- applying

def _resize_matrix(start, length, in_size: int, out_size: int, antialias: bool = False):
  """[B, out, in] resampling weights of the boxes [start, start + length) (pixels):
  crop_and_resize's bilinear taps, or with antialias PIL's (_antialiased_resize_matrix)."""
  if antialias:
    return _antialiased_resize_matrix(start, length, in_size, out_size)
  steps = jnp.arange(out_size, dtype=jnp.float32)
  scale = (length - 1.0) / max(out_size - 1, 1)
  coord = start[:, None] + steps[None, :] * scale[:, None]  # [B, out]
  top = jnp.floor(coord)
  frac = coord - top
  bottom = jnp.ceil(coord)
  one_hot = lambda idx: jax.nn.one_hot(idx.astype(jnp.int32), in_size, dtype=jnp.float32)
  return one_hot(top) * (1.0 - frac)[..., None] + one_hot(bottom) * frac[..., None]


def _antialiased_resize_matrix(start, length, in_size: int, out_size: int):
  """[B, out, in]: PIL's bilinear resize of the crop (torchvision's resized_crop). Output
  pixel k centres at start + (k + 0.5) * scale in the source (scale = length / out);
  source pixel p (centre p + 0.5) weighs max(0, 1 - |p + 0.5 - centre| / max(scale, 1)),
  only inside the box, the weights normalised to sum 1."""
  scale = length / out_size  # [B]
  centre = start[:, None] + (jnp.arange(out_size, dtype=jnp.float32) + 0.5)[None, :] * scale[:, None]
  pixel = jnp.arange(in_size, dtype=jnp.float32)[None, None, :] + 0.5
  weight = jnp.maximum(0.0, 1.0 - jnp.abs(pixel - centre[..., None]) / jnp.maximum(scale, 1.0)[:, None, None])
  inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
  weight = jnp.where(inside, weight, 0.0)
  return weight / jnp.sum(weight, axis=-1, keepdims=True)


def _grayscale(x):
  return jnp.sum(x * jnp.asarray(_LUMA, x.dtype), axis=-1, keepdims=True)


def _blend(a, b, factor):
  f = factor[:, None, None, None]
  return jnp.clip(f * a + (1.0 - f) * b, 0.0, 1.0)


def _rgb_to_hsv(x):
  """tf.image.rgb_to_hsv's formulas."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  value = jnp.max(x, axis=-1)
  spread = value - jnp.min(x, axis=-1)
  saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1.0), 0.0)
  norm = 1.0 / (6.0 * jnp.where(spread > 0, spread, 1.0))
  hue = jnp.where(r == value, norm * (g - b),
                  jnp.where(g == value, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
  hue = jnp.where(spread > 0, hue, 0.0)
  hue = jnp.where(hue < 0, hue + 1.0, hue)
  return hue, saturation, value


def _hsv_to_rgb(h, s, v):
  """tf.image.hsv_to_rgb's formulas."""
  dh = h * 6.0
  dr = jnp.clip(jnp.abs(dh - 3.0) - 1.0, 0.0, 1.0)
  dg = jnp.clip(2.0 - jnp.abs(dh - 2.0), 0.0, 1.0)
  db = jnp.clip(2.0 - jnp.abs(dh - 4.0), 0.0, 1.0)
  base = 1.0 - s
  return jnp.stack([v * (base + s * dr), v * (base + s * dg), v * (base + s * db)], axis=-1)


def _adjust_hue(x, delta):
  h, s, v = _rgb_to_hsv(x)
  return _hsv_to_rgb(jnp.mod(h + delta[:, None, None], 1.0), s, v)


def _brightness(x, f):
  return _blend(x, jnp.zeros_like(x), f)


def _contrast(x, f):
  mean = jnp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True)
  return _blend(x, jnp.broadcast_to(mean, x.shape), f)


def _saturation(x, f):
  return _blend(x, _grayscale(x), f)


_JITTER_FNS = ((_brightness, "brightness"), (_contrast, "contrast"), (_saturation, "saturation"),
               (_adjust_hue, "hue"))


def _color_jitter(x, p):
  """Each image's own order of the four ops; images with jitter off pass through."""
  for position in range(_JITTER_OPS):
    op = jnp.where(p["jitter"], p["jitter_order"][:, position], _JITTER_OPS)[:, None, None, None]
    out = x
    for k, (fn, name) in enumerate(_JITTER_FNS):
      out = jnp.where(op == k, fn(x, p[name]), out)
    x = out
  return x


def _reflect_taps(size: int, kernel_size: int) -> np.ndarray:
  """[k, size, size] 0/1: tap m of output s reads input reflect(s + m - k // 2) (numpy 'reflect')."""
  pad = kernel_size // 2
  taps = np.zeros((kernel_size, size, size), np.float32)
  for m in range(kernel_size):
    for s in range(size):
      t = s + m - pad
      t = -t if t < 0 else (2 * (size - 1) - t if t > size - 1 else t)
      taps[m, s, t] = 1.0
  return taps


def _blur_matrix(sigma, size: int, kernel_size: int):
  half = (kernel_size - 1) / 2
  t = jnp.linspace(-half, half, kernel_size)
  k = jnp.exp(-0.5 * jnp.square(t[None, :] / sigma[:, None]))
  k = k / jnp.sum(k, axis=1, keepdims=True)  # [B, k]
  return jnp.einsum("bm,mst->bst", k, jnp.asarray(_reflect_taps(size, kernel_size)))


def _separable(x, rows, cols):
  """out[b] = rows[b] @ x[b] @ cols[b]^T per channel: [B,S,H] x [B,H,W,C] x [B,T,W] -> [B,S,T,C]."""
  return jnp.einsum("bsh,bhwc,btw->bstc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def _crop_and_flip(images, params: dict, cfg: AugmentConfig):
  """uint8 [B, H, W, 3] -> float32 [B, S, S, 3] in [0, 1]: each image's crop box resampled, then its flip."""
  x = images.astype(jnp.float32) / 255.0
  _, height, width, _ = x.shape
  size = cfg.image_size
  i, j, h, w = (params["crop"][:, k] for k in range(4))
  x = _separable(x, _resize_matrix(i, h, height, size, cfg.antialias), _resize_matrix(j, w, width, size, cfg.antialias))
  return jnp.where(params["flip"][:, None, None, None], x[:, :, ::-1, :], x)


def _normalise(x, cfg: AugmentConfig):
  return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


def crop_flip(images, params: dict, cfg: AugmentConfig):
  """apply() without the photometric ops (RandomResizedCrop + flip + normalise, MoCo's
  linear-probe views); only params' crop and flip are read."""
  return _normalise(_crop_and_flip(images, params, cfg), cfg)


def apply(images, params: dict, cfg: AugmentConfig):
  """uint8 [B, H, W, 3] -> normalised float32 [B, S, S, 3] under `params` (augment.apply's semantics)."""
  x = _color_jitter(_crop_and_flip(images, params, cfg), params)
  size = cfg.image_size
  x = jnp.where(params["grayscale"][:, None, None, None], jnp.broadcast_to(_grayscale(x), x.shape), x)
  blur = _blur_matrix(params["blur_sigma"], size, cfg.blur_kernel_size)
  x = jnp.where(params["blur"][:, None, None, None], _separable(x, blur, blur), x)
  return _normalise(x, cfg)


def view_params(key, batch: int, height: int, width: int, cfg: AugmentConfig, *, num_chunks: int,
                equiv_batch: int | None = None, num_pairs: int | None = None, with_equivariance: bool = True) -> list:
  """Each view's parameters for a batch, view v drawn from fold_in(key, v): x1, x2 one set
  per image, e1, e2 one set per chunk (or per group of consecutive chunks: num_pairs sets),
  repeated over its images (equiv_batch: the images given e1, e2, default the whole batch)."""
  params = [sample_params(jax.random.fold_in(key, view), batch, height, width, cfg) for view in (0, 1)]
  if with_equivariance:
    pairs = num_pairs or num_chunks
    params += [repeat_params(sample_params(jax.random.fold_in(key, view), pairs, height, width, cfg,
                                           crop=cfg.equiv_crop), (equiv_batch or batch) // pairs)
               for view in (2, 3)]
  return params


def _blocks(x, num_chunks: int):
  """[rows, ...] -> [num_chunks, rows / num_chunks, ...]: each chunk's block of consecutive rows."""
  return x.reshape((num_chunks, -1) + x.shape[1:])


def equivariance_images(images, num_chunks: int, equiv_batch: int):
  """The rows of config_lib.equivariance_rows, chunk after chunk: the first equiv_batch /
  num_chunks images of each block, taken as a reshape and a slice, which XLA keeps on the
  devices holding the blocks (a gather by row index could move them)."""
  return _blocks(images, num_chunks)[:, :equiv_batch // num_chunks].reshape((equiv_batch,) + images.shape[1:])


def _interleaved(images, params: list) -> tuple:
  """(images repeated, parameters interleaved): row i V + v is view v of image i, the
  layout the batched view pass reads, and each row stays on the device holding its image."""
  b, count = images.shape[0], len(params)
  interleave = lambda *leaves: jnp.stack(leaves, axis=1).reshape((b * count,) + leaves[0].shape[1:])
  return jnp.repeat(images, count, axis=0), jax.tree.map(interleave, *params)


def _deinterleave(views, count: int) -> list:
  views = views.reshape((-1, count) + views.shape[1:])
  return [views[:, v] for v in range(count)]


def pretraining_views(images, key, cfg: AugmentConfig, *, num_chunks: int, equiv_batch: int | None = None,
                      num_pairs: int | None = None, with_equivariance: bool = True) -> dict:
  """The four views of a (global) uint8 batch, as augment.pretraining_views: each view
  `apply(images, view_params(...)[v])`, e1 and e2 of equivariance_images(images, ...) where
  equiv_batch is under the batch.

  All views come from ONE apply over the interleaved rows: one kernel per op instead of
  one per op and view (compiled for an H200: 125 -> 67 augmentation kernels a step, most
  of those left the per-view parameter draws). With fewer e-view images each block of
  batch / num_chunks images contributes its x rows, then its e rows, so every row still
  stays on its device. (Two applies of different sizes, x and e, made XLA:GPU's compiler
  fail for an H100, "Couldn't find output tile sizes" on the resize dots, where either
  apply alone compiled.)
  """
  b, height, width, _ = images.shape
  equiv_batch = equiv_batch or b
  params = view_params(key, b, height, width, cfg, num_chunks=num_chunks, equiv_batch=equiv_batch,
                       num_pairs=num_pairs, with_equivariance=with_equivariance)
  if equiv_batch == b or not with_equivariance:
    rows, row_params = _interleaved(images, params)
    return dict(zip(("x1", "x2", "e1", "e2"), _deinterleave(apply(rows, row_params, cfg), len(params))))
  x_rows, x_params = _interleaved(images, params[:2])
  e_rows, e_params = _interleaved(equivariance_images(images, num_chunks, equiv_batch), params[2:])
  by_block = lambda x, e: jnp.concatenate([_blocks(x, num_chunks), _blocks(e, num_chunks)],
                                          axis=1).reshape((-1,) + x.shape[1:])
  views = _blocks(apply(by_block(x_rows, e_rows), jax.tree.map(by_block, x_params, e_params), cfg), num_chunks)
  x_per_block = x_rows.shape[0] // num_chunks
  flat = lambda v: v.reshape((-1,) + v.shape[2:])
  x1, x2 = _deinterleave(flat(views[:, :x_per_block]), 2)
  e1, e2 = _deinterleave(flat(views[:, x_per_block:]), 2)
  return {"x1": x1, "x2": x2, "e1": e1, "e2": e2}
