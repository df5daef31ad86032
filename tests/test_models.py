"""Models: parameter counts and the forward pass against torchvision's architecture, shapes, dtypes."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax import models
from care_jax.models import resnet


def _torchvision_param_count(name, stem, width=1.0):
  """Counted from the architecture description, independently of the Flax code:
  conv weights (no bias) + BatchNorm (weight, bias) per conv, no fc."""
  widths = [int(round(c * width)) for c in (64, 128, 256, 512)]
  conv = lambda k, cin, cout: k * k * cin * cout
  bn = lambda c: 2 * c
  total = (conv(3, 3, widths[0]) if stem == "cifar" else conv(7, 3, widths[0])) + bn(widths[0])
  cin = widths[0]
  bottleneck = name == "resnet50"
  for stage, (blocks, w) in enumerate(zip(models.STAGE_SIZES[name], widths)):
    for i in range(blocks):
      stride = 2 if stage > 0 and i == 0 else 1
      if bottleneck:
        out = 4 * w
        total += conv(1, cin, w) + bn(w) + conv(3, w, w) + bn(w) + conv(1, w, out) + bn(out)
      else:
        out = w
        total += conv(3, cin, w) + bn(w) + conv(3, w, w) + bn(w)
      if stride != 1 or cin != out:
        total += conv(1, cin, out) + bn(out)
      cin = out
  return total


def _jit(method, **static):
  """A model's init or apply under jax.jit: op by op, a ResNet pass is hundreds of tiny compiles."""
  return jax.jit(functools.partial(method, **static))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_parameter_counts_match_torchvision(name, stem):
  enc = models.build_encoder(name, stem)
  shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert _count(shapes["params"]) == _torchvision_param_count(name, stem)
  # torchvision's published totals minus the fc layer (512*1000+1000 / 2048*1000+1000).
  published = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000,
               "resnet50": 25_557_032 - 2_049_000}
  if stem == "imagenet":
    assert _count(shapes["params"]) == published[name]


@pytest.mark.parametrize("stem,size,expect_hw", [("cifar", 32, 4), ("imagenet", 64, 2)])
def test_shapes_and_train_mode_updates_batch_stats(stem, size, expect_hw):
  model = models.build_model("resnet18", stem, width=0.125, proj_hidden_dim=32, proj_dim=16)
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  variables = _jit(model.init, train=False)(jax.random.key(0), x)
  feats, proj = _jit(model.apply, train=False)(variables, x)
  chex.assert_shape(feats, (4, models.feature_dim("resnet18", 0.125)))
  chex.assert_shape(proj, (4, 16))
  np.testing.assert_allclose(jnp.linalg.norm(proj, axis=-1), 1.0, rtol=1e-5)
  (_, _), updates = _jit(model.apply, train=True, mutable=["batch_stats"])(variables, x)
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_bfloat16_compute_is_close_to_float32_with_float32_params():
  f32 = models.build_model("resnet18", "cifar", width=0.25, proj_hidden_dim=32, proj_dim=16)
  bf16 = models.build_model("resnet18", "cifar", width=0.25, dtype=jnp.bfloat16, proj_hidden_dim=32, proj_dim=16)
  x = jax.random.uniform(jax.random.key(2), (8, 32, 32, 3))
  variables = _jit(f32.init, train=False)(jax.random.key(0), x)
  chex.assert_trees_all_equal_dtypes(variables, jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False)))
  a_feat, a_proj = _jit(f32.apply, train=True, mutable=["batch_stats"])(variables, x)[0]
  b_feat, b_proj = _jit(bf16.apply, train=True, mutable=["batch_stats"])(variables, x)[0]
  chex.assert_type(b_proj, jnp.float32)
  cos = jnp.sum(a_proj * b_proj, axis=-1)
  assert float(jnp.min(cos)) > 0.98, cos
  assert float(jnp.linalg.norm(a_feat - b_feat) / jnp.linalg.norm(a_feat)) < 0.05


def test_stride2_padding_is_symmetric_like_pytorch():
  # A 3x3 stride-2 conv with padding 1 on 8x8 gives 4x4 and sees pixel (0, 0)
  # at the centre tap of output (0, 0), as PyTorch's padding=1 does.
  conv = models.resnet._conv(1, 3, 2)
  x = jnp.zeros((1, 8, 8, 1)).at[0, 0, 0, 0].set(1.0)
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)
  y = conv.apply({"params": {"kernel": kernel}}, x)
  assert y.shape == (1, 4, 4, 1) and float(y[0, 0, 0, 0]) == 1.0


@pytest.mark.parametrize("shape", [(3, 3, 3, 4), (1, 1, 8, 16), (7, 7, 3, 64), (64, 32), (96, 10)])
def test_kernel_init_is_flax_default_value_for_value(shape):
  # The flat draw only changes how XLA compiles it, not a single number.
  import flax.linen as nn
  key = jax.random.PRNGKey(7)
  ours = jax.jit(resnet.lecun_normal, static_argnums=1)(key, shape)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(nn.linear.default_kernel_init(key, shape)))
  fan_in = np.prod(shape[:-1])
  assert np.abs(np.asarray(ours)).max() <= 2 / 0.87962566 / np.sqrt(fan_in) + 1e-6  # truncated at 2 sigma


def test_blocks_and_head_initialise_exactly_as_with_flax_default_init(monkeypatch):
  import flax.linen as nn
  block, head = resnet.BasicBlock(filters=8, strides=2), resnet.ProjectionHead(hidden_dim=24, out_dim=8)
  init = lambda: (block.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 4)), train=False)["params"],
                  head.init(jax.random.PRNGKey(1), jnp.zeros((2, 12)))["params"])
  ours = init()
  monkeypatch.setattr(resnet, "lecun_normal", nn.linear.default_kernel_init)
  flax_default = init()
  # 3 conv kernels + 3 BN (scale, bias); 2 dense kernels, 1 bias, 1 BN (scale, bias).
  assert len(jax.tree.leaves(ours)) == len(jax.tree.leaves(flax_default)) == 9 + 5
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_default)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_names_and_widths():
  with pytest.raises(ValueError, match="unknown model 'resnet19'; choose one of resnet18, resnet34, resnet50"):
    models.build_encoder("resnet19")
  with pytest.raises(ValueError, match="unknown stem 'tiny'"):
    models.build_encoder("resnet18", stem="tiny")
  for bad in (0, -1, 0.001, "wide"):
    with pytest.raises(ValueError, match="model width must be a number > 0"):
      models.build_encoder("resnet18", width=bad)


def test_hyperboloid_embeddings_lie_on_the_hyperboloid():
  model = resnet.build_model("resnet18", width=0.0625, proj_hidden_dim=16, proj_dim=8, geometry="hyperboloid")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  variables = _jit(model.init)(jax.random.PRNGKey(0), x)
  _, z = _jit(model.apply)(variables, x)
  assert z.shape == (4, 8)
  lorentz = -z[:, 0] ** 2 + jnp.sum(z[:, 1:] ** 2, axis=1)
  np.testing.assert_allclose(lorentz, -1.0, atol=1e-4)
  assert bool(jnp.all(z[:, 0] >= 1.0))
  with pytest.raises(ValueError, match="choose one of"):
    resnet.build_model("resnet18", geometry="poincare")


def test_mocov2_head_has_no_batchnorm_and_a_hidden_bias():
  model = resnet.build_model("resnet18", width=0.0625, proj_hidden_dim=16, proj_dim=8, proj_head="mocov2")
  x = jnp.zeros((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  head = variables["params"]["head"]
  assert "bias" in head["Dense_0"] and "head" not in variables["batch_stats"]


def test_batchnorm_variance_is_stable_when_the_mean_dwarfs_the_spread():
  # Channels of ReLU outputs can sit far from 0 with a small spread; the
  # one-pass E[x^2] - mean^2 loses every digit there in float32.
  rng = np.random.default_rng(0)
  x = (100.0 + 0.01 * rng.normal(size=(64, 2, 2, 3))).astype(np.float32)
  norm = resnet._norm(train=True, dtype=jnp.float32)
  variables = norm.init(jax.random.PRNGKey(0), x)
  y, _ = norm.apply(variables, x, mutable=["batch_stats"])
  x64 = x.astype(np.float64)
  mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(y), (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (30.0, 0.1)])
def test_batchnorm_values_running_stats_and_gradients_match_float64_closed_forms(offset, spread):
  # One-pass shifted moments with a hand-written VJP: against NumPy float64
  # formulas, the gradient included: for L = sum(w * y), with x_hat the
  # normalised input and sigma = sqrt(var + eps), per channel
  #   dL/dbias = sum(w), dL/dscale = sum(w x_hat),
  #   dL/dx = scale / sigma * (w - mean(w) - x_hat * mean(w x_hat)).
  rng = np.random.default_rng(1)
  x = (offset + spread * rng.normal(size=(32, 3, 3, 4))).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  norm = resnet._norm(train=True, dtype=jnp.float32)
  variables = norm.init(jax.random.PRNGKey(0), x)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}

  def loss(params, x):
    y, updates = norm.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum(w * y), (y, updates["batch_stats"])

  (_, (y, stats)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  scale, bias = np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64)
  axes = (0, 1, 2)
  mean, var = x64.mean(axis=axes), x64.var(axis=axes)
  sigma = np.sqrt(var + 1e-5)
  x_hat = (x64 - mean) / sigma
  # float32 rounding of the mean alone moves x_hat by ~eps * offset / spread:
  # the bar is flax's two-pass BatchNorm, run on the same input.
  two_pass = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False)
  y_two_pass, _ = two_pass.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                 mutable=["batch_stats"])
  err, err_two_pass = (np.abs(np.asarray(v) - (x_hat * scale + bias)).max() for v in (y, y_two_pass))
  assert err <= 2 * err_two_pass + 1e-6, (err, err_two_pass)
  tol = dict(rtol=1e-4, atol=1e-4 * (1 + offset / (100 * spread)))
  np.testing.assert_allclose(np.asarray(y), x_hat * scale + bias, **tol)
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-6, atol=1e-6)
  # The running variance is torch's: the unbiased batch variance (ddof=1), where flax keeps the biased one.
  running_var = 0.9 + 0.1 * x64.var(axis=axes, ddof=1)
  np.testing.assert_allclose(np.asarray(stats["var"]), running_var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_params["bias"]), w64.sum(axis=axes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_params["scale"]), (w64 * x_hat).sum(axis=axes), **tol)
  g_x_expected = scale / sigma * (w64 - w64.mean(axis=axes) - x_hat * (w64 * x_hat).mean(axis=axes))
  np.testing.assert_allclose(np.asarray(g_x), g_x_expected, rtol=1e-3, atol=1e-3 * np.abs(g_x_expected).max())
  # Inference mode normalises with the running statistics.
  eval_norm = resnet._norm(train=False, dtype=jnp.float32)
  y_eval = eval_norm.apply({"params": params, "batch_stats": stats}, x)
  np.testing.assert_allclose(np.asarray(y_eval), (x64 - 0.1 * mean) / np.sqrt(running_var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)


def test_batchnorm_in_bfloat16_returns_bfloat16_values_and_input_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 2, 3)).astype(jnp.bfloat16)
  norm = resnet._norm(train=True, dtype=jnp.bfloat16)
  variables = norm.init(jax.random.PRNGKey(0), x)
  f = lambda x: norm.apply(variables, x, mutable=["batch_stats"])[0]
  y, g = f(x), jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x)
  assert y.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
  assert variables["batch_stats"]["mean"].dtype == jnp.float32


@pytest.mark.parametrize("views, groups", [(3, 1), (3, 2), (1, 2)])
def test_batchnorm_over_interleaved_views_normalises_each_view_alone(views, groups):
  # Rows i V + v hold view v of image i. Against NumPy float64: each view
  # normalised by its own mean and variance, the running averages updated
  # once per view in order (m^V s + sum_v m^(V-1-v) (1 - m) stat_v), and the
  # input gradient of L = sum(w * y) per view by the closed form above.
  # groups = 2 (nn.DataParallel's per-GPU BatchNorm on 2 GPUs): each half of the
  # images has its own statistics per view, the running averages follow the first.
  rng = np.random.default_rng(2)
  view_of_row = np.tile(np.arange(views), 8)[:, None, None, None]
  offsets, spreads = 5.0 * np.arange(views), rng.uniform(0.5, 3.0, views)  # views differ in mean and spread
  x = (offsets[view_of_row] + spreads[view_of_row] * rng.normal(size=(8 * views, 2, 2, 4))).astype(np.float32)
  x[len(x) // 2:] = 2.0 * x[len(x) // 2:] - 1.0  # the second half of the images: other statistics
  w = rng.normal(size=x.shape).astype(np.float32)
  norm = resnet.BatchNorm(use_running_average=False, views=views, groups=groups)
  variables = norm.init(jax.random.PRNGKey(0), x)
  stats0 = {"mean": jnp.asarray(rng.normal(size=4), jnp.float32), "var": jnp.asarray(rng.uniform(1, 2, 4), jnp.float32)}
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}

  def loss(x):
    y, updates = norm.apply({"params": params, "batch_stats": stats0}, x, mutable=["batch_stats"])
    return jnp.sum(w * y), (y, updates["batch_stats"])

  (_, (y, stats)), g_x = jax.value_and_grad(loss, has_aux=True)(x)
  assert set(variables["batch_stats"]) == {"mean", "var"}
  scale, bias = np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64)
  mean_run, var_run = np.asarray(stats0["mean"], np.float64), np.asarray(stats0["var"], np.float64)
  rows_per_group = len(x) // groups
  for g in range(groups):
    for v in range(views):
      rows = np.arange(g * rows_per_group, (g + 1) * rows_per_group)[v::views]
      xv, wv = x[rows].astype(np.float64), w[rows].astype(np.float64)
      mean, var = xv.mean(axis=(0, 1, 2)), xv.var(axis=(0, 1, 2))
      sigma = np.sqrt(var + 1e-5)
      x_hat = (xv - mean) / sigma
      np.testing.assert_allclose(np.asarray(y)[rows], x_hat * scale + bias, rtol=1e-4, atol=1e-4)
      expected = scale / sigma * (wv - wv.mean(axis=(0, 1, 2)) - x_hat * (wv * x_hat).mean(axis=(0, 1, 2)))
      np.testing.assert_allclose(np.asarray(g_x)[rows], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
      if g == 0:
        mean_run, var_run = 0.9 * mean_run + 0.1 * mean, 0.9 * var_run + 0.1 * xv.var(axis=(0, 1, 2), ddof=1)
  np.testing.assert_allclose(np.asarray(stats["mean"]), mean_run, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["var"]), var_run, rtol=1e-5)
  with pytest.raises(ValueError, match=f"do not hold {views} interleaved views"):
    norm.apply({"params": params, "batch_stats": stats0}, x[:7], mutable=["batch_stats"])


# ---------------- torchvision's forward pass in NumPy (float64) ----------------

def _np_conv(x, kernel, stride, pad):
  """torch.nn.Conv2d(bias=False, stride, padding=pad) on NHWC x with an HWIO kernel."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + stride * oh:stride, j:j + stride * ow:stride] @ kernel[i, j]
  return out


def _np_max_pool(x):
  """torch.nn.MaxPool2d(3, stride=2, padding=1)."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], axis=0)


class _NumpyTorchvision:
  """torchvision's ResNet forward (BasicBlock, Bottleneck v1.5, conv1 -> bn1 -> relu
  [-> maxpool] -> layer1..4 -> avgpool) and the release's head, reading the Flax
  variables by name; BatchNorm in train mode records its new running averages."""

  def __init__(self, variables, train):
    self.params, self.stats, self.train = variables["params"], variables["batch_stats"], train
    self.new_stats = {}

  def bn(self, x, path):
    p, s = self._at(self.params, path), self._at(self.stats, path)
    if self.train:
      axes = tuple(range(x.ndim - 1))
      mean, var = x.mean(axis=axes), x.var(axis=axes)
      # torch's running averages: momentum 0.1, the variance unbiased (ddof=1).
      self.new_stats[path] = (0.9 * s["mean"] + 0.1 * mean, 0.9 * s["var"] + 0.1 * x.var(axis=axes, ddof=1))
    else:
      mean, var = s["mean"], s["var"]
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  def conv(self, x, path, stride):
    kernel = self._at(self.params, path)["kernel"]
    return _np_conv(x, kernel, stride, kernel.shape[0] // 2)

  @staticmethod
  def _at(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  def backbone(self, x, name, stem):
    relu = lambda v: np.maximum(v, 0.0)
    b = ("backbone",)
    x = relu(self.bn(self.conv(x, b + ("stem_conv",), 1 if stem == "cifar" else 2), b + ("stem_bn",)))
    if stem == "imagenet":
      x = _np_max_pool(x)
    bottleneck, index = name == "resnet50", 0
    for stage, blocks in enumerate(models.STAGE_SIZES[name]):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        blk = b + (f"{'Bottleneck' if bottleneck else 'BasicBlock'}_{index}",)
        index += 1
        if bottleneck:  # 1x1 -> 3x3 (the stride) -> 1x1
          out = relu(self.bn(self.conv(x, blk + ("Conv_0",), 1), blk + ("BatchNorm_0",)))
          out = relu(self.bn(self.conv(out, blk + ("Conv_1",), stride), blk + ("BatchNorm_1",)))
          out = self.bn(self.conv(out, blk + ("Conv_2",), 1), blk + ("BatchNorm_2",))
        else:  # 3x3 (the stride) -> 3x3
          out = relu(self.bn(self.conv(x, blk + ("Conv_0",), stride), blk + ("BatchNorm_0",)))
          out = self.bn(self.conv(out, blk + ("Conv_1",), 1), blk + ("BatchNorm_1",))
        if "proj_conv" in self._at(self.params, blk):  # downsample: conv1x1(stride) + BN
          identity = self.bn(self.conv(x, blk + ("proj_conv",), stride), blk + ("proj_bn",))
        else:
          assert stride == 1 and x.shape[-1] == out.shape[-1]
          identity = x
        x = relu(out + identity)
    return x.mean(axis=(1, 2))

  def head(self, f):
    head = self.params["head"]
    hidden = np.maximum(self.bn(f @ head["Dense_0"]["kernel"], ("head", "BatchNorm_0")), 0.0)
    z = hidden @ head["Dense_1"]["kernel"] + head["Dense_1"]["bias"]
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem,size", [("cifar", 16), ("imagenet", 64)])  # the last stage 2 x 2: pooled
@pytest.mark.parametrize("train", [False, True])
def test_forward_pass_matches_torchvision_transcribed_in_numpy(name, stem, size, train):
  # Random weights, BatchNorm affine terms and running statistics, so every
  # scale, shift, ReLU, stride and shortcut shows in the output.
  model = models.build_model(name, stem, width=0.0625, proj_hidden_dim=16, proj_dim=8)
  x = np.random.default_rng(0).normal(size=(4, size, size, 3))
  variables = _jit(model.init, train=False)(jax.random.key(0), jnp.zeros((2, size, size, 3)))
  rng = np.random.default_rng(1)

  def randomised(path, leaf):
    kind = path[-1].key
    if kind in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    if kind in ("bias", "mean"):
      return 0.2 * rng.normal(size=leaf.shape)
    return rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))  # He-scaled kernels

  variables = jax.tree_util.tree_map_with_path(randomised, jax.device_get(variables))
  ref = _NumpyTorchvision(variables, train)
  want_features = ref.backbone(x, name, stem)
  want_z = ref.head(want_features)
  as32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  with jax.default_matmul_precision("float32"):
    if train:
      (features, z), updates = _jit(model.apply, train=True, mutable=["batch_stats"])(as32(variables), x)
    else:
      features, z = _jit(model.apply, train=False)(as32(variables), x)
  # Train-mode BatchNorm over the last stages' few values (4 images x 2 x 2 at the
  # end) amplifies float32 rounding: measured up to 6e-5 of the largest feature
  # (ResNet-50); a wrong ReLU, stride, pooling or shortcut moves them by O(1).
  tol = 5e-4 if train else 1e-4
  np.testing.assert_allclose(np.asarray(features), want_features, rtol=tol, atol=tol * np.abs(want_features).max())
  np.testing.assert_allclose(np.asarray(z), want_z, rtol=tol, atol=tol)
  if train:
    for path, (mean, var) in ref.new_stats.items():
      got = ref._at(jax.device_get(updates["batch_stats"]), path)
      np.testing.assert_allclose(got["mean"], mean, rtol=tol, atol=tol * np.abs(mean).max(), err_msg=str(path))
      np.testing.assert_allclose(got["var"], var, rtol=tol, err_msg=str(path))
    assert len(ref.new_stats) == len(jax.tree.leaves(updates["batch_stats"])) // 2
