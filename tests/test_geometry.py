"""geometry.py against closed forms, grid search and brute-force loops."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax import geometry, losses
from tests.test_losses import _lorentz_boost, _rotation, _sphere, _symplectic_matrix


def test_wahba_recovers_a_random_rotation():
  rng = np.random.default_rng(0)
  for d in (3, 16, 128):
    z = _sphere(rng, 300, d)
    r = _rotation(rng, d)
    z_aug = z @ r.T
    got = geometry.wahba_rotation(jnp.float32(z), jnp.float32(z_aug))
    chex.assert_shape(got, (d, d))
    np.testing.assert_allclose(got, r, atol=2e-4)
    assert geometry.wahba_error(z, z_aug) < 1e-3 * np.sqrt(300)


def test_wahba_error_matches_grid_search_in_2d_including_reflections():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(20, 2))
  angles = np.linspace(0, 2 * np.pi, 200_001)
  rots = np.stack([np.stack([np.cos(angles), -np.sin(angles)], -1),
                   np.stack([np.sin(angles), np.cos(angles)], -1)], -2)  # [A, 2, 2]
  reflection = np.diag([1.0, -1.0])
  for target in (z @ _rotation(rng, 2).T + 0.1 * rng.normal(size=z.shape), z @ reflection.T):
    errs = np.linalg.norm(np.einsum("nd,aed->ane", z, rots) - target, axis=(1, 2))
    np.testing.assert_allclose(geometry.wahba_error(z, target), errs.min(), rtol=1e-4)
    r = geometry.wahba_rotation(z, target)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)  # a rotation, never the reflection


def test_wahba_rotation_is_proper_and_optimal_when_best_map_is_a_reflection():
  rng = np.random.default_rng(2)
  d = 5
  z = rng.normal(size=(50, d))
  flip = np.eye(d)
  flip[2, 2] = -1
  z_aug = z @ (flip @ _rotation(rng, d)).T
  r = np.asarray(geometry.wahba_rotation(z, z_aug))
  np.testing.assert_allclose(r.T @ r, np.eye(d), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
  best = float(geometry.wahba_error(z, z_aug))
  assert best > 1.0  # no rotation maps onto a reflection
  # No random rotation does better (optimality over SO(d)).
  for _ in range(500):
    assert np.linalg.norm(z @ _rotation(rng, d).T - z_aug) >= best - 1e-4


def np_gamma(z, za):
  n = len(z)
  vals = []
  for i in range(n):
    for j in range(n):
      if i != j:
        num = (np.sum((za[j] - za[i]) ** 2) - np.sum((z[j] - z[i]) ** 2)) ** 2
        den = (np.sum((za[j] - z[j]) ** 2) + np.sum((za[i] - z[i]) ** 2)) ** 2
        vals.append(num / den)
  return np.mean(vals)


def test_relative_equivariance_matches_brute_force_and_is_zero_for_rotations():
  rng = np.random.default_rng(3)
  z = _sphere(rng, 9, 4)
  za = _sphere(rng, 9, 4)
  np.testing.assert_allclose(geometry.relative_equivariance(z, za), np_gamma(z, za), rtol=1e-4)
  # Small moves (the trained encoders' regime): every denominator far below 1.
  nearby = z + 0.05 * rng.normal(size=z.shape)
  nearby /= np.linalg.norm(nearby, axis=1, keepdims=True)
  np.testing.assert_allclose(geometry.relative_equivariance(z, nearby), np_gamma(z, nearby), rtol=1e-3)
  rotated = z @ _rotation(rng, 4).T
  assert geometry.relative_equivariance(z, rotated) < 1e-6
  # Unmoved points contribute 0 rather than NaN.
  assert np.isfinite(geometry.relative_equivariance(z, z))


def test_composition_error():
  rng = np.random.default_rng(4)
  d = 8
  z = _sphere(rng, 100, d)
  ra, rb, rc = (_rotation(rng, d) for _ in range(3))
  z_a, z_b = z @ ra.T, z @ rb.T
  z_ba = z @ (rb @ ra).T
  assert geometry.composition_error(z, z_a, z_ba) < 1e-5
  assert geometry.composition_error(z, z_a, z_ba, z_b=z_b) < 1e-5
  # A composite that acts as a different rotation: the error is the closed form.
  z_bad = z @ rc.T
  want = np.linalg.norm(rc - rb @ ra) / (2 * np.sqrt(d))
  np.testing.assert_allclose(geometry.composition_error(z, z_a, z_bad, z_b=z_b), want, rtol=1e-4)
  assert 0 < want <= 1


def test_form_preservation_error():
  rng = np.random.default_rng(5)
  d = 6
  cases = [(_rotation(rng, d), None), (_lorentz_boost(d), "minkowski"), (_symplectic_matrix(rng, d), "symplectic")]
  for r, form in cases:
    j = losses.bilinear_form(form, d)
    j = np.eye(d) if j is None else np.asarray(j)
    assert geometry.form_preservation_error(r, j) < 1e-5
    assert geometry.form_preservation_error(r + 0.2 * rng.normal(size=(d, d)), j) > 1e-2
  assert geometry.form_preservation_error(_lorentz_boost(d), np.eye(d)) > 0.1
  # Off the group, the value is the pulled-back form's distance: rows map as z -> R z,
  # so <Rz, Rz'>_J = z^T (R^T J R) z' and R^T J R is compared with J (not R J R^T,
  # which agrees on the group and differs off it).
  r, j = np.random.default_rng(0).normal(size=(4, 4)), np.diag([-1.0, 1.0, 1.0, 1.0])
  want = np.linalg.norm(r.T @ j @ r - j) / np.linalg.norm(j)
  assert abs(np.linalg.norm(r @ j @ r.T - j) / np.linalg.norm(j) - want) > 0.5  # the case tells them apart
  np.testing.assert_allclose(float(geometry.form_preservation_error(r, j)), want, rtol=1e-5)


def test_fit_linear_map_recovers_a_boost():
  rng = np.random.default_rng(6)
  z = rng.normal(size=(40, 5))
  m = _lorentz_boost(5)
  np.testing.assert_allclose(geometry.fit_linear_map(z, z @ m.T), m, atol=1e-4)


def test_geometry_jit_vmap_and_bfloat16():
  rng = np.random.default_rng(7)
  z = jnp.float32(np.stack([_sphere(rng, 16, 4) for _ in range(3)]))
  za = jnp.float32(np.stack([_sphere(rng, 16, 4) for _ in range(3)]))
  for fn in (geometry.wahba_error, geometry.relative_equivariance):
    eager = np.array([fn(z[i], za[i]) for i in range(3)])
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(z, za), eager, rtol=1e-5)
    got = fn(z[0].astype(jnp.bfloat16), za[0].astype(jnp.bfloat16))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, fn(z[0].astype(jnp.bfloat16).astype(jnp.float32),
                                       za[0].astype(jnp.bfloat16).astype(jnp.float32)), rtol=1e-5)


def test_geometry_errors():
  with pytest.raises(ValueError, match=r"z and z_aug must have the same shape, got \(4, 3\) and \(5, 3\)"):
    geometry.wahba_error(jnp.ones((4, 3)), jnp.ones((5, 3)))
  with pytest.raises(ValueError, match="square of the same size"):
    geometry.form_preservation_error(jnp.ones((3, 3)), jnp.ones((4, 4)))
