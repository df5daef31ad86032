"""How well an augmentation acts on embeddings as one linear isometry.

Embeddings are rows: z [n, d] before and z_aug [n, d] after one augmentation
applied to all n inputs. The paper writes F = z^T (d x n) and asks for
min_{R in SO(d)} ||R F - F_a||_F, which is ||z R^T - z_aug||_F here.
All computations run in float32 (float64 when given float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_pair(fn: str, z, z_aug):
  for name, x in (("z", z), ("z_aug", z_aug)):
    if jnp.ndim(x) != 2:
      raise ValueError(f"{fn}: {name} must be [n, d] rows, got shape {jnp.shape(x)}")
  if jnp.shape(z) != jnp.shape(z_aug):
    raise ValueError(f"{fn}: z and z_aug must have the same shape, got {jnp.shape(z)} and {jnp.shape(z_aug)}")
  dt = jnp.promote_types(jnp.asarray(z).dtype, jnp.float32)
  return jnp.asarray(z, dt), jnp.asarray(z_aug, dt)


def wahba_rotation(z, z_aug) -> jax.Array:
  """The rotation R in SO(d) minimising ||z R^T - z_aug||_F (Wahba's problem).

  M = z_aug^T z = U S V^T; R = U diag(1, ..., 1, det(U V^T)) V^T. The
  determinant correction makes R a proper rotation even when the best
  orthogonal map is a reflection.
  """
  z, z_aug = _as_pair("wahba_rotation", z, z_aug)
  u, _, vt = jnp.linalg.svd(z_aug.T @ z)
  sign = jnp.sign(jnp.linalg.det(u @ vt))
  # sign(det) is 0 only for an exactly singular U V^T, which orthogonal
  # factors never are; keep 1 there so R stays finite.
  sign = jnp.where(sign == 0, 1.0, sign)
  return (u * jnp.ones(u.shape[1], u.dtype).at[-1].set(sign)) @ vt


def wahba_error(z, z_aug) -> jax.Array:
  """min_{R in SO(d)} ||z R^T - z_aug||_F; 0 when one rotation maps z onto z_aug."""
  z, z_aug = _as_pair("wahba_error", z, z_aug)
  r = wahba_rotation(z, z_aug)
  return jnp.linalg.norm(z @ r.T - z_aug)


def _pairwise_sq_dists(x):
  sq = jnp.sum(x * x, axis=-1)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def relative_equivariance(z, z_aug, eps: float = 1e-12) -> jax.Array:
  """gamma_f: mean over pairs x != x' of
       (||f(ax') - f(ax)||^2 - ||f(x') - f(x)||^2)^2
       / (||f(ax') - f(x')||^2 + ||f(ax) - f(x)||^2)^2.

  The numerator is how much the augmentation changed the pair's distance (0
  for any isometry); the denominator how far the two points moved, so the
  ratio does not reward an encoder for ignoring the augmentation. A pair whose
  points did not move at all has a zero numerator too and counts as 0. Lower
  is more equivariant; an exact rotation gives 0.
  """
  z, z_aug = _as_pair("relative_equivariance", z, z_aug)
  n = z.shape[0]
  if n < 2:
    raise ValueError(f"relative_equivariance: needs at least 2 rows, got {n}")
  num = (_pairwise_sq_dists(z_aug) - _pairwise_sq_dists(z)) ** 2
  moved = jnp.sum((z_aug - z) ** 2, axis=-1)
  den = (moved[:, None] + moved[None, :]) ** 2
  ratio = num / jnp.maximum(den, eps)
  offdiag = ~jnp.eye(n, dtype=bool)
  return jnp.sum(jnp.where(offdiag, ratio, 0.0)) / (n * (n - 1))


def composition_error(z, z_a, z_ba, z_b=None) -> jax.Array:
  """Corollary 1: how far R_{b o a} is from R_b R_a, in [0, 1], 0 = perfect.

  z = f(x), z_a = f(a(x)), z_ba = f(b(a(x))), each [n, d]. R_a is fitted on
  (z, z_a) and R_{b o a} on (z, z_ba). R_b is fitted on (z, z_b) with
  z_b = f(b(x)) when given -- the corollary's statement, b's action on the
  original inputs -- and otherwise on (z_a, z_ba). The result is
  ||R_{b o a} - R_b R_a||_F / (2 sqrt(d)); 2 sqrt(d) is the largest distance
  between two orthogonal d x d matrices.
  """
  r_a = wahba_rotation(z, z_a)
  r_ba = wahba_rotation(z, z_ba)
  r_b = wahba_rotation(z, z_b) if z_b is not None else wahba_rotation(z_a, z_ba)
  d = r_a.shape[0]
  return jnp.linalg.norm(r_ba - r_b @ r_a) / (2.0 * jnp.sqrt(float(d)))


def form_preservation_error(r, j) -> jax.Array:
  """||R^T J R - J||_F / ||J||_F: 0 when R preserves the bilinear form J.

  J = I tests orthogonality, diag(-1, 1, ..., 1) the Lorentz group,
  [[0, I], [-I, 0]] the symplectic group.
  """
  r = jnp.asarray(r)
  j = jnp.asarray(j)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or j.shape != r.shape:
    raise ValueError(f"form_preservation_error: R and J must be square of the same size, got {r.shape} and {j.shape}")
  dt = jnp.promote_types(r.dtype, jnp.float32)
  r, j = r.astype(dt), j.astype(dt)
  return jnp.linalg.norm(r.T @ j @ r - j) / jnp.linalg.norm(j)


def fit_linear_map(z, z_aug) -> jax.Array:
  """Least-squares A minimising ||z A^T - z_aug||_F (no constraint), for non-SO(d) groups."""
  z, z_aug = _as_pair("fit_linear_map", z, z_aug)
  sol, *_ = jnp.linalg.lstsq(z, z_aug)
  return sol.T
