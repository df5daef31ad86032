"""losses.py against brute-force NumPy loops, closed forms and autodiff."""
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from care_jax import losses


def _sphere(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rotation(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


# ---------------- brute-force references (float64 double loops) ----------------

def np_info_nce(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  n, b = len(z), len(z1)
  total = align = unif = 0.0
  for i in range(n):
    pos = i + b if i < b else i - b
    s_pos = z[i] @ z[pos] / t
    denom = sum(np.exp(z[i] @ z[j] / t) for j in range(n) if j != i)
    total += -np.log(np.exp(s_pos) / denom)
    align += -s_pos
    unif += np.log(denom)
  return total / n, align / n, unif / n


def np_equivariance(z1, z2, k, j=None):
  z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
  j = np.eye(z1.shape[1]) if j is None else np.asarray(j, np.float64)
  n = len(z1) // k
  chunks = []
  for c in range(k):
    a, b = z1[c * n:(c + 1) * n], z2[c * n:(c + 1) * n]
    s = 0.0
    for p in range(n):
      for q in range(n):
        if p != q:
          s += (a[p] @ j @ a[q] - b[p] @ j @ b[q]) ** 2
    chunks.append(2.0 / n * s)
  return np.mean(chunks)


def np_wang_isola(z, t):
  n = len(z)
  vals = [np.exp(z[i] @ z[j] / t) for i in range(n) for j in range(n) if i != j]
  return np.log(np.mean(vals))


def np_moco(q, k, queue, t):
  out = []
  for i in range(len(q)):
    logits = [q[i] @ k[i] / t] + [q[i] @ queue[j] / t for j in range(len(queue))]
    out.append(-logits[0] + np.log(np.sum(np.exp(logits))))
  return np.mean(out)


def _lorentz_boost(d, rapidity=0.7):
  m = np.eye(d)
  ch, sh = np.cosh(rapidity), np.sinh(rapidity)
  m[0, 0], m[0, 1], m[1, 0], m[1, 1] = ch, sh, sh, ch
  return m


def _symplectic_matrix(rng, d):
  h = d // 2
  a = rng.normal(size=(h, h)) * 0.3
  s = a + a.T  # symmetric -> [[I, S], [0, I]] is symplectic
  m = np.eye(d)
  m[:h, h:] = s
  return m


# ---------------- InfoNCE ----------------

@pytest.mark.parametrize("b,d,t", [(4, 3, 0.5), (6, 8, 0.2), (8, 5, 1.0)])
def test_info_nce_matches_brute_force(b, d, t):
  rng = np.random.default_rng(b * d)
  z1, z2 = _sphere(rng, b, d), _sphere(rng, b, d)
  want, want_align, want_unif = np_info_nce(z1, z2, t)
  got = losses.info_nce(jnp.float32(z1), jnp.float32(z2), t)
  chex.assert_shape(got, ())
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(losses.alignment(z1, z2, t), want_align, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.uniformity(z1, z2, t), want_unif, rtol=1e-5)


def test_info_nce_is_stable_at_small_temperature():
  # exp(1/0.01) overflows float32; the logsumexp form must not.
  rng = np.random.default_rng(0)
  z1 = _sphere(rng, 8, 4)
  z2 = _sphere(rng, 8, 4)
  got = losses.info_nce(z1, z2, 0.01)
  assert np.isfinite(got)
  with jax.enable_x64(True):
    want = losses.info_nce(jnp.float64(z1), jnp.float64(z2), 0.01)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _naive_info_nce(z1, z2, t):
  """Plain autodiff formulation (no custom VJP), the gradient's second truth."""
  z = jnp.concatenate([z1, z2])
  s = z @ z.T / t
  n, b = z.shape[0], z1.shape[0]
  s = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, s)
  pos = jnp.concatenate([jnp.arange(b, n), jnp.arange(b)])
  return jnp.mean(jax.nn.logsumexp(s, axis=1) - s[jnp.arange(n), pos])


def test_info_nce_gradient_matches_autodiff_and_finite_differences():
  rng = np.random.default_rng(1)
  z1, z2 = jnp.float32(_sphere(rng, 6, 5)), jnp.float32(_sphere(rng, 6, 5))
  g_custom = jax.grad(losses.info_nce, argnums=(0, 1))(z1, z2, 0.3)
  g_naive = jax.grad(_naive_info_nce, argnums=(0, 1))(z1, z2, 0.3)
  for a, b in zip(g_custom, g_naive):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    z1d, z2d = jnp.float64(z1), jnp.float64(z2)
    # Jitted: check_grads evaluates f and its VJPs dozens of times, op by op
    # each a handful of tiny compiles.
    check_grads(jax.jit(lambda a, b: losses.info_nce(a, b, 0.3)), (z1d, z2d), order=2, modes=["rev"])


def test_blockwise_info_nce_equals_materialised(monkeypatch):
  rng = np.random.default_rng(2)
  z1, z2 = jnp.float32(_sphere(rng, 256, 16)), jnp.float32(_sphere(rng, 256, 16))
  value = lambda: losses.info_nce(z1, z2, 0.5)
  grads = lambda: jax.grad(losses.info_nce, argnums=(0, 1))(z1, z2, 0.5)
  v_full, g_full = value(), grads()
  monkeypatch.setattr(losses, "_MAX_MATERIALISED_ROWS", 128)
  monkeypatch.setattr(losses, "_BLOCK_ROWS", 128)
  assert losses._row_blocks(512) == 128
  np.testing.assert_allclose(value(), v_full, rtol=1e-6)
  for a, b in zip(grads(), g_full):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _float64_info_nce_and_grads(z1, z2, t):
  with jax.enable_x64(True):
    z1d, z2d = jnp.float64(z1), jnp.float64(z2)
    value, grads = jax.value_and_grad(_naive_info_nce, argnums=(0, 1))(z1d, z2d, t)
    return np.asarray(value), [np.asarray(g) for g in grads]


def _assert_info_nce_matches_float64(z1, z2, t, rtol=1e-5):
  want, want_grads = _float64_info_nce_and_grads(z1, z2, t)
  got, got_grads = jax.value_and_grad(losses.info_nce, argnums=(0, 1))(
      jnp.float32(z1), jnp.float32(z2), t)
  np.testing.assert_allclose(got, want, rtol=rtol)
  scale = max(np.abs(g).max() for g in want_grads)
  for a, b in zip(got_grads, want_grads):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _info_nce_regimes():
  # The uniformity kernel takes its shared-shift path while max|z|^2 / t <= 40
  # and falls back to the row-max logsumexp beyond it (at run time), or always
  # uses the row-max path when 1 / t > 40 (decided at trace time).
  rng = np.random.default_rng(11)
  unit = _sphere(rng, 32, 6), _sphere(rng, 32, 6)
  at_bound = [z.copy() for z in unit]
  at_bound[0][0] *= 2.0  # |z|^2 / t = 40 exactly at t = 0.1: the worst case kept
  at_bound[1][0] = -at_bound[0][0]  # antipodal: S = -40, the most negative entry
  # One far row: shared-shift would underflow every other row's sum to 0.
  far = [z.copy() for z in unit]
  far[0][3] *= 10.0
  scaled = [3.0 * z for z in unit]  # |z|^2 / t = 90 for every row
  return {
      "unit rows, shared shift": (unit, 0.1),
      "at the bound": (at_bound, 0.1),
      "one far row, fallback": (far, 0.1),
      "all rows beyond the bound, fallback": (scaled, 0.1),
      "t < 0.025, static row max": (unit, 0.01),
  }


@pytest.mark.parametrize("regime", list(_info_nce_regimes()))
def test_info_nce_value_and_gradient_in_every_regime(regime):
  (z1, z2), t = _info_nce_regimes()[regime]
  _assert_info_nce_matches_float64(z1, z2, t)


@pytest.mark.parametrize("regime", ["unit rows, shared shift", "one far row, fallback",
                                    "t < 0.025, static row max"])
def test_blockwise_info_nce_in_every_regime(regime, monkeypatch):
  (z1, z2), t = _info_nce_regimes()[regime]
  rng = np.random.default_rng(12)
  # 2B = 512 rows so the blocked path splits them into four row blocks.
  z1 = np.concatenate([z1, _sphere(rng, 224, 6)])
  z2 = np.concatenate([z2, _sphere(rng, 224, 6)])
  monkeypatch.setattr(losses, "_MAX_MATERIALISED_ROWS", 128)
  monkeypatch.setattr(losses, "_BLOCK_ROWS", 128)
  assert losses._row_blocks(512) == 128
  _assert_info_nce_matches_float64(z1, z2, t)


@pytest.mark.parametrize("regime", list(_info_nce_regimes()))
def test_info_nce_accelerator_path_in_every_regime(regime, monkeypatch):
  # GPUs and TPUs take the row-max path alone (no run-time branch); run that
  # branch of lax.platform_dependent here on the CPU.
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default, **per_platform: default(*args))
  (z1, z2), t = _info_nce_regimes()[regime]
  _assert_info_nce_matches_float64(z1, z2, t)


def _data_dependent_branches(stablehlo: str) -> int:
  """lax.cond's on computed booleans: each lowers its predicate to a scalar i32 branch index.

  (The platform switch of lax.platform_dependent indexes by constants.)
  """
  return len(re.findall(r"stablehlo.convert %\S+ : \(tensor<i1>\) -> tensor<i32>", stablehlo))


def test_info_nce_has_no_run_time_branch_on_gpus():
  # A data-dependent lax.cond becomes an HLO conditional, which XLA:GPU runs by
  # reading the predicate back to the host: a sync in every step. On a CPU the
  # shared-shift path keeps its guard; lowered for a GPU there is no branch.
  rng = np.random.default_rng(13)
  z1, z2 = jnp.float32(_sphere(rng, 16, 8)), jnp.float32(_sphere(rng, 16, 8))
  grad = jax.jit(jax.value_and_grad(lambda a, b: losses.info_nce(a, b, 0.1), argnums=(0, 1)))
  lowered = {p: jax.export.export(grad, platforms=[p])(z1, z2).mlir_module() for p in ("cpu", "cuda", "tpu")}
  assert _data_dependent_branches(lowered["cpu"]) == 2  # the forward's and the backward's guard
  assert _data_dependent_branches(lowered["cuda"]) == 0
  assert _data_dependent_branches(lowered["tpu"]) == 0


def test_wang_isola_uniformity_matches_brute_force():
  rng = np.random.default_rng(3)
  z = _sphere(rng, 7, 4)
  np.testing.assert_allclose(losses.wang_isola_uniformity(z), np_wang_isola(z, 1.0), rtol=1e-5)
  np.testing.assert_allclose(losses.wang_isola_uniformity(z, 0.5), np_wang_isola(z, 0.5), rtol=1e-5)


def test_moco_info_nce_matches_brute_force_and_stops_key_gradients():
  rng = np.random.default_rng(4)
  q, k, queue = _sphere(rng, 5, 6), _sphere(rng, 5, 6), _sphere(rng, 11, 6)
  np.testing.assert_allclose(losses.moco_info_nce(q, k, queue, 0.2), np_moco(q, k, queue, 0.2), rtol=1e-5)
  gk, gqueue = jax.grad(losses.moco_info_nce, argnums=(1, 2))(jnp.float32(q), jnp.float32(k), jnp.float32(queue), 0.2)
  assert not np.any(gk) and not np.any(gqueue)


# ---------------- equivariance ----------------

FORMS = [None, "minkowski", "symplectic", "matrix"]


def _form(name, d, rng):
  if name == "matrix":
    return rng.normal(size=(d, d))
  return name


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,d,k", [(8, 4, 2), (12, 6, 3), (10, 2, 1)])
def test_equivariance_matches_brute_force(b, d, k, form):
  rng = np.random.default_rng(b + d + k)
  z1, z2 = _sphere(rng, b, d), _sphere(rng, b, d)
  f = _form(form, d, rng)
  j = np.asarray(losses.bilinear_form(f, d)) if f is not None else None
  want = np_equivariance(z1, z2, k, j)
  got = losses.equivariance_loss(jnp.float32(z1), jnp.float32(z2), k, form=f)
  chex.assert_shape(got, ())
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_equivariance_direct_and_covariance_paths_agree(form):
  rng = np.random.default_rng(5)
  k, n, d = 3, 24, 6  # n > d: equivariance_loss takes the covariance path
  a, b = _sphere(rng, k * n, d), _sphere(rng, k * n, d)
  j = losses.bilinear_form(_form(form, d, rng), d)
  a3, b3 = jnp.float32(a).reshape(k, n, d), jnp.float32(b).reshape(k, n, d)
  direct = losses._offdiag_sq_gram_diff_direct(a3, b3, j)
  cov = losses._offdiag_sq_gram_diff_covariance(a3, b3, j)
  np.testing.assert_allclose(cov, direct, rtol=1e-4, atol=1e-4)
  # And the public entry point, on the covariance path, against the NumPy loop.
  want = np_equivariance(a, b, k, None if j is None else np.asarray(j))
  np.testing.assert_allclose(losses.equivariance_loss(a, b, k, form=j), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [8, 40])  # both paths (D = 16)
def test_equivariance_is_zero_for_a_rotation_and_positive_otherwise(n):
  rng = np.random.default_rng(6)
  d, k = 16, 4
  z1 = _sphere(rng, k * n, d)
  rotated = np.concatenate([z1[c * n:(c + 1) * n] @ _rotation(rng, d) for c in range(k)])
  assert losses.equivariance_loss(z1, rotated, k) < 1e-4
  warped = z1 @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)))
  warped /= np.linalg.norm(warped, axis=1, keepdims=True)
  assert losses.equivariance_loss(z1, warped, k) > 0.1


def test_equivariance_is_zero_for_lorentz_and_symplectic_isometries():
  rng = np.random.default_rng(7)
  d, b = 6, 12
  z = rng.normal(size=(b, d))
  boost = _lorentz_boost(d)
  assert losses.equivariance_loss(z, z @ boost.T, 2, form="minkowski") < 1e-4
  assert losses.equivariance_loss(z, z @ boost.T, 2) > 1e-2  # a boost is no rotation
  s = _symplectic_matrix(rng, d)
  assert losses.equivariance_loss(z, z @ s.T, 2, form="symplectic") < 1e-4
  assert losses.equivariance_loss(z, z @ s.T, 2) > 1e-2
  # And each form's loss is positive for a map outside its group.
  stretch = np.diag(np.linspace(0.5, 1.5, d))
  assert losses.equivariance_loss(z, z @ stretch.T, 2, form="minkowski") > 1e-2
  assert losses.equivariance_loss(z, z @ stretch.T, 2, form="symplectic") > 1e-2
  assert losses.equivariance_loss(z, z @ s.T, 2, form="minkowski") > 1e-2  # symplectic, not Lorentz


def np_hyperbolic_info_nce(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  n, b = len(z), len(z1)
  lorentz = lambda x, y: -x[0] * y[0] + x[1:] @ y[1:]
  sim = lambda i, j: -np.arccosh(max(-lorentz(z[i], z[j]), 1.0)) / t
  total = 0.0
  for i in range(n):
    pos = i + b if i < b else i - b
    denom = sum(np.exp(sim(i, j)) for j in range(n) if j != i)
    total += -np.log(np.exp(sim(i, pos)) / denom)
  return total / n


def _hyperboloid(rng, n, d, scale=1.0):
  v = rng.normal(size=(n, d - 1)) * scale
  return np.concatenate([np.sqrt(1 + np.sum(v * v, axis=1, keepdims=True)), v], axis=1)


def test_hyperbolic_info_nce_matches_brute_force():
  rng = np.random.default_rng(11)
  z1, z2 = _hyperboloid(rng, 6, 4), _hyperboloid(rng, 6, 4)
  with jax.enable_x64(True):
    got = losses.hyperbolic_info_nce(jnp.asarray(z1), jnp.asarray(z2), 0.3)
    np.testing.assert_allclose(got, np_hyperbolic_info_nce(z1, z2, 0.3), rtol=1e-10)
    check_grads(jax.jit(lambda a, b: losses.hyperbolic_info_nce(a, b, 0.3)), (jnp.asarray(z1), jnp.asarray(z2)),
                order=1, modes=["rev"], eps=1e-6)  # small step: arccosh is steep near 1
  # Isometries of the hyperboloid (a boost) leave the loss unchanged.
  boost = _lorentz_boost(4, rapidity=0.4)
  np.testing.assert_allclose(losses.hyperbolic_info_nce(z1 @ boost.T, z2 @ boost.T, 0.3),
                             losses.hyperbolic_info_nce(z1, z2, 0.3), rtol=1e-4)
  assert np.isfinite(losses.hyperbolic_info_nce(z1, z1, 0.3))  # identical positives: clamped, finite


def test_equivariance_gradients():
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    for n, d in [(4, 5), (10, 3)]:  # direct and covariance paths
      z1, z2 = jnp.asarray(_sphere(rng, 2 * n, d)), jnp.asarray(_sphere(rng, 2 * n, d))
      check_grads(jax.jit(lambda a, b: losses.equivariance_loss(a, b, 2, "minkowski")), (z1, z2), order=2, modes=["rev"])
      check_grads(jax.jit(lambda a, b: losses.equivariance_loss(a, b, 2)), (z1, z2), order=2, modes=["rev"])
      j = jnp.asarray(rng.normal(size=(d, d)))  # a general form gets a gradient too
      check_grads(jax.jit(lambda m: losses.equivariance_loss(z1, z2, 2, m)), (j,), order=1, modes=["rev"])


def test_equivariance_dot_gradients_agree_across_paths():
  # The dot product's two hand-written VJPs (direct n x n, covariance 2D x 2D)
  # against plain autodiff of the general-form covariance path with J = I.
  rng = np.random.default_rng(10)
  k, n, d = 2, 48, 16
  # Off the sphere, so the diagonal's share (|a_i|^2 - |b_i|^2)^2 is not 0.
  z1, z2 = jnp.float32(rng.normal(size=(k * n, d))), jnp.float32(rng.normal(size=(k * n, d)))
  a3, b3 = z1.reshape(k, n, d), z2.reshape(k, n, d)
  eye = jnp.eye(d)
  paths = {
      "direct": lambda a, b: losses._offdiag_sq_gram_diff_direct(a, b, None),
      "covariance": lambda a, b: losses._offdiag_sq_gram_diff_covariance(a, b, None),
      "autodiff, J = I": lambda a, b: losses._offdiag_sq_gram_diff_covariance(a, b, eye),
  }
  weights = jnp.float32([0.7, 1.3])  # a different cotangent per chunk
  results = {name: jax.value_and_grad(lambda a, b, f=f: jnp.sum(weights * f(a, b)), argnums=(0, 1))(a3, b3)
             for name, f in paths.items()}
  want_value, want_grads = results.pop("autodiff, J = I")
  for name, (value, grads) in results.items():
    np.testing.assert_allclose(value, want_value, rtol=1e-4, err_msg=name)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()), err_msg=name)


# ---------------- CARE, transforms, dtypes, errors ----------------

def test_care_loss_combines_terms():
  rng = np.random.default_rng(9)
  z1, z2, e1, e2 = (jnp.float32(_sphere(rng, 8, 4)) for _ in range(4))
  total, terms = losses.care_loss(z1, z2, e1, e2, temperature=0.5, equiv_weight=0.03, num_chunks=2)
  nce, _, _ = np_info_nce(np.asarray(z1), np.asarray(z2), 0.5)
  equi = np_equivariance(np.asarray(e1), np.asarray(e2), 2)
  np.testing.assert_allclose(total, nce + 0.03 * equi, rtol=1e-5)
  np.testing.assert_allclose(terms["equivariance"], equi, rtol=1e-5)
  np.testing.assert_allclose(terms["alignment"] + terms["uniformity"], terms["info_nce"], rtol=1e-6)
  simclr, t2 = losses.care_loss(z1, z2, temperature=0.5, equiv_weight=0.0)
  np.testing.assert_allclose(simclr, nce, rtol=1e-5)
  assert t2["equivariance"] == 0
  with pytest.raises(ValueError, match="equiv_weight"):
    losses.care_loss(z1, z2, temperature=0.5, equiv_weight=0.1)


KERNELS = {
    "info_nce": lambda a, b: losses.info_nce(a, b, 0.5),
    "alignment": lambda a, b: losses.alignment(a, b, 0.5),
    "uniformity": lambda a, b: losses.uniformity(a, b, 0.5),
    "equivariance": lambda a, b: losses.equivariance_loss(a, b, 2),
    "equivariance_cov": lambda a, b: losses.equivariance_loss(a, b, 1),
    "wang_isola": lambda a, b: losses.wang_isola_uniformity(a),
    "moco": lambda a, b: losses.moco_info_nce(a, b, b[::-1], 0.2),
    "care": lambda a, b: losses.care_loss(a, b, b, a, temperature=0.5, equiv_weight=0.1, num_chunks=2)[0],
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_jit_vmap_and_bfloat16(name):
  fn = KERNELS[name]
  rng = np.random.default_rng(10)
  a = jnp.float32(np.stack([_sphere(rng, 8, 4) for _ in range(3)]))
  b = jnp.float32(np.stack([_sphere(rng, 8, 4) for _ in range(3)]))
  eager = np.array([fn(a[i], b[i]) for i in range(3)])
  np.testing.assert_allclose(jax.jit(fn)(a[0], b[0]), eager[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(a, b), eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(fn)))(a, b),
                             np.stack([jax.grad(fn)(a[i], b[i]) for i in range(3)]), rtol=1e-5, atol=1e-6)
  # bfloat16 inputs: the result is float32 and as accurate as float32 on the same values.
  a16, b16 = a[0].astype(jnp.bfloat16), b[0].astype(jnp.bfloat16)
  got = fn(a16, b16)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, fn(a16.astype(jnp.float32), b16.astype(jnp.float32)), rtol=1e-6, atol=1e-6)


def test_errors_name_the_argument_and_numbers():
  z = jnp.ones((12, 4))
  with pytest.raises(ValueError, match=r"B=12 is not divisible by num_chunks=5"):
    losses.equivariance_loss(z, z, 5)
  with pytest.raises(ValueError, match=r"chunk size n=B/num_chunks=12/12=1 is below 2"):
    losses.equivariance_loss(z, z, 12)
  with pytest.raises(ValueError, match=r"same shape, got \(12, 4\) and \(12, 3\)"):
    losses.equivariance_loss(z, jnp.ones((12, 3)), 2)
  with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape"):
    losses.info_nce(z, jnp.ones((10, 4)), 0.5)
  with pytest.raises(ValueError, match=r"temperature must be > 0, got 0"):
    losses.info_nce(z, z, 0)
  with pytest.raises(ValueError, match=r"'symplectic' needs an even dimension, got D=3"):
    losses.equivariance_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), 2, "symplectic")
  with pytest.raises(ValueError, match=r"unknown form 'hyperbolic'"):
    losses.equivariance_loss(z, z, 2, "hyperbolic")
  with pytest.raises(ValueError, match=r"must be a \[B, D\] matrix"):
    losses.info_nce(jnp.ones(4), jnp.ones(4), 0.5)
