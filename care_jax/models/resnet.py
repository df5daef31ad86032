"""ResNet-18/34/50 in flax.linen with torchvision's layout, and CARE's model.

torchvision layout: convolutions without bias, explicit symmetric padding
(so stride-2 convolutions see the same pixels as PyTorch's, unlike 'SAME'),
basic blocks for 18/34, bottlenecks with the stride on the 3x3 conv for 50,
1x1 projection shortcuts where the shape changes, and no fc layer: the
backbone returns globally average-pooled features [B, F]. BatchNorm uses
PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9; eps 1e-5).

Stems: 'cifar' (3x3 stride-1 conv, no max-pool: the reference release's
CIFAR/STL model) and 'imagenet' (7x7 stride-2 conv + 3x3 stride-2 max-pool).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from care_jax import random_util

STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
STEMS = ("cifar", "imagenet")
_BASE_WIDTHS = (64, 128, 256, 512)


def lecun_normal(key, shape, dtype=jnp.float32):
  """flax's default kernel init, value for value, drawn as a flat vector.

  LeCun normal: a normal truncated at +-2 sigma with variance 1 / fan_in, fan_in
  = prod(shape[:-1]). Drawn flat (random_util): the quickstart ResNet-18's init
  compiled in 18 s on 2 AMD cores with the shaped draws, ~4 s flat. Same arithmetic as jax.nn.initializers.variance_scaling; tests/test_models.py
  checks the values equal flax's bit for bit.
  """
  variance = jnp.array(1.0 / math.prod(shape[:-1]), dtype=dtype)
  stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
  return random_util.drawn_flat(jax.random.truncated_normal, key, shape, lower=-2, upper=2, dtype=dtype) * stddev


BATCHNORM_MOMENTUM = 0.9  # flax's convention: running = 0.9 running + 0.1 batch (PyTorch's 0.1)


class BatchNorm(nn.Module):
  """flax's nn.BatchNorm over the last axis (the same variables and names), with
  the batch statistics taken in one pass that stays exact where a channel's mean
  dwarfs its spread, and torch's running variance: the release's BatchNorm keeps
  the unbiased batch variance, n / (n - 1) of the biased one its normalisation
  uses (flax keeps the biased one; 3% apart for MoCo's 32-image groups in a 1-D
  BatchNorm, 0.4% for a head's 256).

  flax's one-pass E[x^2] - mean^2 cancels catastrophically in float32 there
  (ReLU outputs can sit far from 0 with a small spread; tested), and its
  two-pass E[(x - mean)^2] reads the input once more, a pass the mean must
  finish first: on a train step bound by memory traffic that read is ~11% of
  all bytes (XLA's cost analysis of the quickstart step: 41.7 -> 36.9 MB per
  image). Shifting by a per-channel constant k near the mean, here the first
  image's mean (the variance does not depend on k; the gradient treats it as
  a constant), gives var = E[(x-k)^2] - E[x-k]^2 from one fused pass with
  cancellation of order |mean - k|^2 / var, i.e. none to speak of.

  views = V > 1 (training only): the rows are V views of each image,
  interleaved (row i V + v is view v of image i), and each view is normalised
  with its own statistics, exactly as V passes of one view each would be; the
  running averages end as those V passes in order leave them. Interleaving,
  not stacking view after view, keeps each image's views on the device that
  holds the image.

  groups = G > 1 (training only): statistics per group of consecutive rows (of
  each view), as nn.DataParallel's per-GPU BatchNorm computes them on G GPUs;
  the running averages follow group 0 alone, as DataParallel keeps only the
  first GPU's replica's buffers.
  """
  use_running_average: bool
  momentum: float = BATCHNORM_MOMENTUM
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  views: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      return self._normalise(x, ra_mean.value, ra_var.value, scale, bias)
    views = self.views if not self.is_initializing() else 1
    groups = self.groups if not self.is_initializing() else 1
    if views == 1 and groups == 1:
      mean, var = _batch_moments(x, tuple(range(x.ndim - 1)))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * _unbiased(var, x.size // x.shape[-1])
      return self._normalise(x, mean, var, scale, bias)
    if x.shape[0] % (views * groups):
      raise ValueError(f"BatchNorm: {x.shape[0]} rows do not hold {views} interleaved views of each image"
                       + (f" in {groups} groups of images" if groups > 1 else ""))
    split = x.reshape((groups, x.shape[0] // (groups * views), views) + x.shape[1:])  # [G, images, V, ..., C]
    mean, var = _batch_moments(split, (1,) + tuple(range(3, split.ndim - 1)))  # [G, V, C] each
    # V updates in order, from group 0's statistics: m^V s + sum_v m^(V-1-v) (1 - m) stat_v.
    m = self.momentum
    weights = jnp.asarray([(1 - m) * m ** (views - 1 - v) for v in range(views)], jnp.float32)
    ra_mean.value = m ** views * ra_mean.value + weights @ mean[0]
    ra_var.value = m ** views * ra_var.value + weights @ _unbiased(var[0], split[0, :, 0].size // split.shape[-1])
    per_group_view = (groups, 1, views) + (1,) * (split.ndim - 4) + features
    return self._normalise(split, mean.reshape(per_group_view), var.reshape(per_group_view), scale,
                           bias).reshape(x.shape)

  def _normalise(self, x, mean, var, scale, bias):
    return ((x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias).astype(self.dtype)


def _unbiased(var, n: int):
  """The batch variance over n values per channel as torch's BatchNorm keeps it in its
  running average: unbiased, x n / (n - 1) (the normalisation itself uses the biased one)."""
  return var * (n / max(n - 1, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _batch_moments(x, axes):
  """Per-channel float32 (mean, biased variance) of x over `axes` (all but the last), in one pass."""
  return _batch_moments_fwd(x, axes)[0]


def _batch_moments_fwd(x, axes):
  """(mean, var), each shaped as x with `axes` dropped; axes[0] is the image axis."""
  x32 = x.astype(jnp.float32)
  # The shift: the first entry's mean along the reduced axes (for NHWC, the
  # first image's channel means), a constant near each channel's mean. On a
  # batch sharded over devices it is one [C] collective before the moments'
  # own, as the two-pass form's mean was before its variance.
  shift = jnp.mean(jax.lax.slice_in_dim(x32, 0, 1, axis=axes[0]), axis=axes, keepdims=True)
  # Both reductions read x itself (the shift fused into the second), so XLA
  # can make them one multi-output pass; a materialised x - shift read twice
  # cost as many bytes as the two-pass form.
  mean = jnp.mean(x32, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x32 - shift), axis=axes)
  var = jnp.maximum(0.0, var - jnp.square(mean - shift).reshape(var.shape))
  return (mean.reshape(var.shape), var), (x, mean)  # x in its own dtype: a bf16 residual stays bf16


def _batch_moments_bwd(axes, residuals, cotangents):
  # d mean / dx = 1/N, d var / dx = 2 (x - mean) / N: from x and the mean alone,
  # where autodiff of the shifted form kept x - shift as one more x-sized
  # residual (2 more passes over x per BatchNorm: 117 vs 134 MB for one layer).
  x, mean = residuals
  g_mean, g_var = (jnp.expand_dims(g, axes) for g in cotangents)
  n = math.prod(x.shape[a] for a in axes)
  return (((g_mean + 2.0 * g_var * (x.astype(jnp.float32) - mean)) / n).astype(x.dtype),)


_batch_moments.defvjp(_batch_moments_fwd, _batch_moments_bwd)


def _norm(train: bool, dtype, views: int = 1, groups: int = 1, name=None):
  return BatchNorm(use_running_average=not train, dtype=dtype, views=views, groups=groups, name=name)


def _conv(features, kernel, strides=1, dtype=jnp.float32, name=None):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=lecun_normal, name=name)


def _shortcut(x, out: int, strides: int, train: bool, dtype, views: int, groups: int):
  """Identity, or a 1x1 projection + BatchNorm where the shape changes (call
  from inside a compact method: the modules join the calling block)."""
  if strides == 1 and x.shape[-1] == out:
    return x
  x = _conv(out, 1, strides, dtype, name="proj_conv")(x)
  return _norm(train, dtype, views, groups, name="proj_bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs; expansion 1."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_groups: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, views: int = 1):
    g = self.bn_groups
    y = _conv(self.filters, 3, self.strides, self.dtype)(x)
    y = nn.relu(_norm(train, self.dtype, views, g)(y))
    y = _conv(self.filters, 3, 1, self.dtype)(y)
    y = _norm(train, self.dtype, views, g)(y)
    return nn.relu(_shortcut(x, self.filters, self.strides, train, self.dtype, views, g) + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here, as torchvision 'v1.5') -> 1x1 x4; expansion 4."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_groups: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, views: int = 1):
    out, g = self.filters * self.expansion, self.bn_groups
    y = nn.relu(_norm(train, self.dtype, views, g)(_conv(self.filters, 1, 1, self.dtype)(x)))
    y = nn.relu(_norm(train, self.dtype, views, g)(_conv(self.filters, 3, self.strides, self.dtype)(y)))
    y = _norm(train, self.dtype, views, g)(_conv(out, 1, 1, self.dtype)(y))
    return nn.relu(_shortcut(x, out, self.strides, train, self.dtype, views, g) + y)


class ResNet(nn.Module):
  """Backbone: images [B, H, W, C] -> pooled features [B, F] (float32).

  views = V > 1: the rows are V interleaved views of each image (row i V + v:
  view v of image i) and every BatchNorm normalises each view with its own
  statistics; bn_groups = G > 1: per group of consecutive rows too (per-GPU
  BatchNorm); see BatchNorm.
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  widths: Sequence[int]
  stem: str = "cifar"
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, images, train: bool = False, views: int = 1):
    x = jnp.asarray(images, self.dtype)
    if self.stem == "cifar":
      x = _conv(self.widths[0], 3, 1, self.dtype, name="stem_conv")(x)
    else:
      x = _conv(self.widths[0], 7, 2, self.dtype, name="stem_conv")(x)
    x = nn.relu(_norm(train, self.dtype, views, self.bn_groups, name="stem_bn")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = self.block_cls(width, strides, self.dtype, self.bn_groups)(x, train, views)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


class ProjectionHead(nn.Module):
  """Linear(no bias) -> BatchNorm -> ReLU -> Linear(out_dim), as the release.

  batch_norm=False gives MoCo-v2's head: Linear(with bias) -> ReLU -> Linear.
  """
  hidden_dim: int = 512
  out_dim: int = 128
  dtype: Any = jnp.float32
  batch_norm: bool = True
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False, views: int = 1):
    x = nn.Dense(self.hidden_dim, use_bias=not self.batch_norm, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=lecun_normal)(x)
    x = nn.relu(_norm(train, self.dtype, views, self.bn_groups)(x) if self.batch_norm else x)
    return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=lecun_normal)(x).astype(jnp.float32)


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


def lift_to_hyperboloid(v):
  """R^{D-1} -> the hyperboloid {x in R^D : <x, x>_L = -1, x_0 > 0}: x = (sqrt(1 + |v|^2), v).

  The inverse of dropping the time coordinate; smooth everywhere, and the
  distance to the origin (1, 0, ..., 0) grows like arcsinh|v|, so a large head
  output cannot overflow the way the exponential map's cosh would.
  """
  v = v.astype(jnp.float32)
  return jnp.concatenate([jnp.sqrt(1.0 + jnp.sum(v * v, axis=-1, keepdims=True)), v], axis=-1)


PROJECTION_HEADS = ("simclr", "mocov2")
EMBEDDINGS = {"sphere": l2_normalize, "hyperboloid": lift_to_hyperboloid, "symplectic": l2_normalize}


class ContrastiveModel(nn.Module):
  """Encoder f = embed(head(backbone(x))): returns (features, projections).

  geometry 'sphere' / 'symplectic': unit vectors; 'hyperboloid': the head
  gives D - 1 numbers, lifted onto the D-dimensional hyperboloid. views = V > 1
  (training): the rows are V interleaved views of each image, each view
  normalised by BatchNorm with its own statistics (as V separate calls would).
  """
  backbone: nn.Module
  head: nn.Module
  geometry: str = "sphere"

  def __call__(self, images, train: bool = False, views: int = 1):
    features = self.backbone(images, train, views)
    return features, EMBEDDINGS[self.geometry](self.head(features, train, views))


def _scaled_widths(width: float):
  try:
    w = float(width)
  except (TypeError, ValueError):
    w = float("nan")
  if not w > 0 or round(_BASE_WIDTHS[0] * w) < 1:
    raise ValueError(f"model width must be a number > 0 giving at least 1 channel "
                     f"(e.g. 0.125, 0.25, 0.5, 1.0, 2.0), got {width!r}")
  return tuple(max(1, int(round(c * w))) for c in _BASE_WIDTHS)


def build_encoder(name: str, stem: str = "cifar", width: float = 1.0, dtype=jnp.float32,
                  bn_groups: int = 1) -> ResNet:
  """The backbone: module.apply(variables, images, train=bool) -> features [B, F]."""
  if name not in STAGE_SIZES:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(STAGE_SIZES))}")
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
  block = Bottleneck if name == "resnet50" else BasicBlock
  return ResNet(STAGE_SIZES[name], block, _scaled_widths(width), stem, dtype, bn_groups)


def build_model(name: str, stem: str = "cifar", width: float = 1.0, dtype=jnp.float32,
                proj_hidden_dim: int = 512, proj_dim: int = 128, geometry: str = "sphere",
                proj_head: str = "simclr", bn_groups: int = 1) -> ContrastiveModel:
  """Backbone + projection head; apply(...) returns (features, projections [B, proj_dim]).

  proj_head: 'simclr' (the release's, with BatchNorm) or 'mocov2' (no BatchNorm).
  bn_groups: training-mode BatchNorm statistics per group of consecutive rows.
  """
  if geometry not in EMBEDDINGS:
    raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(EMBEDDINGS)}")
  if proj_head not in PROJECTION_HEADS:
    raise ValueError(f"unknown projection head {proj_head!r}; choose one of {', '.join(PROJECTION_HEADS)}")
  head_dim = proj_dim - 1 if geometry == "hyperboloid" else proj_dim
  return ContrastiveModel(build_encoder(name, stem, width, dtype, bn_groups),
                          ProjectionHead(proj_hidden_dim, head_dim, dtype, batch_norm=proj_head == "simclr",
                                         bn_groups=bn_groups),
                          geometry)


def feature_dim(name: str, width: float = 1.0) -> int:
  expansion = 4 if name == "resnet50" else 1
  return _scaled_widths(width)[-1] * expansion


__all__ = ["build_encoder", "build_model", "feature_dim", "l2_normalize", "lift_to_hyperboloid", "ResNet",
           "ProjectionHead", "ContrastiveModel", "STAGE_SIZES", "STEMS"]
