"""CARE's loss kernels as pure functions of embedding matrices.

Every kernel takes rows [B, D] (one embedding per row) of any float dtype and
computes in float32 (float64 stays float64), so bfloat16 activations lose
nothing in the reduction. The InfoNCE kernel and the dot-product equivariance
kernels (both the n x n and the D x D path) have hand-written VJPs: reverse
mode (jax.grad) works, forward mode (jax.jvp, jacfwd) does not. Nothing here
normalises: the encoder's head puts the rows on the unit sphere, and the
kernels are also used off it (hyperboloid, symplectic forms).

  info_nce = alignment + uniformity            (SimCLR NT-Xent over 2B anchors)
  equivariance_loss                             (CARE's L_equi, one shared
                                                 augmentation pair per chunk)
  care_loss = info_nce + weight * equivariance_loss
  wang_isola_uniformity, moco_info_nce          (ablation and MoCo-v2 variant)
  hyperbolic_info_nce                           (NT-Xent on the hyperboloid)
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Form = Union[None, str, jax.Array, np.ndarray]

# Above this many rows (2B) the InfoNCE similarity matrix is processed in row
# blocks and recomputed in the backward pass instead of being stored: 8192 rows
# is a 256 MiB float32 matrix; B = 16384 would otherwise need ~12 GiB.
_MAX_MATERIALISED_ROWS = 8192
_BLOCK_ROWS = 2048


def _compute_dtype(x) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _check_rows(name: str, x) -> None:
  if jnp.ndim(x) != 2:
    raise ValueError(f"{name} must be a [B, D] matrix of row embeddings, got shape {jnp.shape(x)}")


def _check_pair(fn: str, z1, z2, names=("z1", "z2")) -> None:
  _check_rows(f"{fn}: {names[0]}", z1)
  _check_rows(f"{fn}: {names[1]}", z2)
  if jnp.shape(z1) != jnp.shape(z2):
    raise ValueError(f"{fn}: {names[0]} and {names[1]} must have the same shape, "
                     f"got {jnp.shape(z1)} and {jnp.shape(z2)}")


def _check_temperature(fn: str, temperature) -> float:
  t = float(temperature)
  if not t > 0:
    raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
  return t


# --------------------------------------------------------------------------
# InfoNCE / NT-Xent
# --------------------------------------------------------------------------
#
# With z = [z1; z2] (N = 2B rows) and S = z z^T / tau, every anchor i has the
# positive p(i) = i +- B and the other 2B - 2 rows as negatives:
#   info_nce   = mean_i [ lse_{j != i} S_ij - S_{i p(i)} ]
#   alignment  = mean_i [ -S_{i p(i)} ]
#   uniformity = mean_i [ lse_{j != i} S_ij ]
# The uniformity term carries all the O(N^2 D) work, so it has a hand-written
# VJP: d/dz = (P + P^T) z / (N tau) with P the row softmax of S (diagonal 0):
# ONE [N, N] x [N, D] product, where autodiff of z @ z.T would spend two.
#
# Two ways to get lse and P + P^T, both exact:
#
# Shared-shift path (one exp per entry in all). With c_i = |z_i|^2 / (2 tau),
# S_ij <= c_i + c_j (Cauchy-Schwarz, then AM-GM), so
#   E_ij = exp(S_ij - c_i - c_j) = exp(-|z_i - z_j|^2 / (2 tau)) <= 1
# is symmetric, and with C = max_j c_j, w_j = exp(c_j - C), r = E w:
#   lse_i = c_i + C + log r_i,    P_ij + P_ji = E_ij (w_j / r_i + w_i / r_j).
# No row max, no second exp, no transpose (a transpose of [N, N] costs more
# than an exp pass on XLA:CPU). Every term E_ij w_j is >= exp(-2 max|z|^2 /
# tau), so while max|z|^2 / tau <= 40 (unit rows with tau >= 0.025) nothing
# leaves float32's normal range.
#
# Row-max path (three exps per entry: logsumexp, then P and P^T apart), for
# anything beyond that bound. lax.cond picks it, on values of size N x D at
# most: a cond carrying the [N, N] residuals or lse measured 1.2-1.4x slower
# for the whole kernel at N = 2048 on XLA:CPU, one on the scalar loss and the
# [N, D] gradient costs nothing measurable. (Under vmap over a batch of
# losses the cond becomes a select and runs both paths: correct, but slower.)
#
# The shared shift is for CPUs only. On a GPU the data-dependent cond is an
# HLO conditional, which XLA:GPU runs by copying the predicate to the host and
# waiting for the stream: two host syncs in every train step (forward and
# backward), each stalling the ~1400 kernels queued behind it. There the
# row-max path alone runs, with no branch: its extra exp passes over [N, N]
# are fused elementwise work a GPU does in microseconds at N = 2B = 1024.
# lax.platform_dependent makes the choice when the step is lowered, so an
# ahead-of-time compile for a GPU from a CPU host gets the GPU's path too
# (experiments/gpu_aot_profile.py counts the conditionals: 2 -> 0).
#
# Measured, forward+backward of the uniformity term, N = 2048, D = 128, XLA:CPU
# 2 cores: row-max path alone 27.1 ms, shared-shift path 22.1 ms, floor 19.7;
# N = 512: shared-shift 1.20-1.24 ms, floor 0.92 ms. Also tried at N = 512
# and slower: r as a sum-reduction instead of the gemv (1.33 ms), and a
# backward with no [N, N] elementwise pass, (P + P^T) z = (E (w z)) / r +
# w (E (z / r)), as one [N, N] x [N, 2D] product (1.87 ms) or two (1.60 ms):
# the extra product costs more than the pass it saves.
# (One global shift exp(S - max|z|^2/tau) instead of c_i + c_j would make the
# same bound much tighter: it underflows on rows far from every other row.)

_SHARED_SHIFT_MAX_SQ_NORM_OVER_T = 40.0


def _masked_similarity(z_rows, z_all, row_offset, inv_t):
  """S[rows, :] with the self-similarity of each row set to -inf."""
  # Scaling the [rows, D] operand, not the [rows, N] product, saves a pass.
  # (A scatter of -inf onto the diagonal instead of this where() measured 1.5x
  # slower for forward+backward at 2B = 2048 on XLA:CPU: it breaks fusion.)
  s = (z_rows * inv_t) @ z_all.T
  rows = row_offset + jnp.arange(z_rows.shape[0])[:, None]
  cols = jnp.arange(z_all.shape[0])[None, :]
  return jnp.where(rows == cols, -jnp.inf, s)


def _shared_shift_kernel(z_rows, z_all, c_rows, c_all, row_offset, inv_t):
  """E[rows, :] = exp(S - c_i - c_j) with the diagonal set to 0."""
  s = (z_rows * inv_t) @ z_all.T
  rows = row_offset + jnp.arange(z_rows.shape[0])[:, None]
  cols = jnp.arange(z_all.shape[0])[None, :]
  return jnp.where(rows == cols, 0.0, jnp.exp(s - c_rows[:, None] - c_all[None, :]))


def _row_blocks(n: int) -> int:
  """Rows per block: all of them when small, else a divisor of n near _BLOCK_ROWS."""
  if n <= _MAX_MATERIALISED_ROWS:
    return n
  for size in range(_BLOCK_ROWS, 127, -1):
    if n % size == 0:
      return size
  return n  # No usable divisor: fall back to the materialised path.


def _blockwise(fn, z, block):
  """Applies fn(z_block, row_offset) over row blocks of z and concatenates."""
  n = z.shape[0]
  if block == n:
    return fn(z, 0)
  starts = jnp.arange(0, n, block)
  out = jax.lax.map(lambda s: fn(jax.lax.dynamic_slice_in_dim(z, s, block), s), starts)
  return out.reshape((n,) + out.shape[2:])


def _row_max_lse(z, inv_t):
  """lse_i over j != i by the row-max logsumexp (row blocks for large N)."""
  return _blockwise(
      lambda zb, off: jax.nn.logsumexp(_masked_similarity(zb, z, off, inv_t), axis=1),
      z, _row_blocks(z.shape[0]))


def _row_max_sym_softmax_times_z(s_rows, lse_rows, lse, z):
  return (jnp.exp(s_rows - lse_rows[:, None]) + jnp.exp(s_rows - lse[None, :])) @ z


def _row_max_grad(z, lse, inv_t):
  """(P + P^T) z by the row-max path, recomputing S block by block."""
  def one_block(zb, off):
    lse_b = jax.lax.dynamic_slice_in_dim(lse, off, zb.shape[0])
    return _row_max_sym_softmax_times_z(_masked_similarity(zb, z, off, inv_t), lse_b, lse, z)

  return _blockwise(one_block, z, _row_blocks(z.shape[0]))


class _RowMaxResiduals(NamedTuple):
  z: jax.Array
  s: Optional[jax.Array]  # masked S when materialised, else None
  lse: jax.Array


class _SharedShiftResiduals(NamedTuple):
  z: jax.Array
  e: Optional[jax.Array]  # E when materialised, else None
  c: jax.Array
  w: jax.Array
  inv_r: jax.Array
  ok: jax.Array  # False: the rows broke the bound; the backward takes the row-max path


def _mean_negative_logsumexp(z, temperature):
  """mean_i lse_{j != i} z_i.z_j / tau: the shared-shift path on CPUs, row-max elsewhere."""
  if 1.0 / temperature > _SHARED_SHIFT_MAX_SQ_NORM_OVER_T:
    return _mean_nlse(z, temperature, False)  # even unit rows break the bound
  return jax.lax.platform_dependent(
      z, cpu=lambda z: _mean_nlse(z, temperature, True),
      default=lambda z: _mean_nlse(z, temperature, False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _mean_nlse(z, temperature, shared_shift):
  return _mean_nlse_fwd(z, temperature, shared_shift)[0]


def _mean_nlse_fwd(z, temperature, shared_shift):
  inv_t = 1.0 / temperature
  n = z.shape[0]
  block = _row_blocks(n)
  if not shared_shift:
    if block == n:
      s = _masked_similarity(z, z, 0, inv_t)
      lse = jax.nn.logsumexp(s, axis=1)
      return jnp.mean(lse), _RowMaxResiduals(z, s, lse)
    lse = _row_max_lse(z, inv_t)
    return jnp.mean(lse), _RowMaxResiduals(z, None, lse)

  c = jnp.sum(z * z, axis=1) * (0.5 * inv_t)
  c_max = jnp.max(c)
  w = jnp.exp(c - c_max)
  if block == n:
    e = _shared_shift_kernel(z, z, c, c, 0, inv_t)
    r = e @ w
  else:
    e = None  # Recomputed block by block in the backward pass.
    r = _blockwise(lambda zb, off: _shared_shift_kernel(
        zb, z, jax.lax.dynamic_slice_in_dim(c, off, block), c, off, inv_t) @ w, z, block)
  ok = 2.0 * c_max <= _SHARED_SHIFT_MAX_SQ_NORM_OVER_T
  # The shared-shift loss is computed outside the cond and passed through:
  # the same mean taken inside the branch measured 15% slower for the whole
  # kernel at N = 2048 (XLA:CPU runs a branch's ops less efficiently).
  loss = jax.lax.cond(ok, lambda z, loss: loss,
                      lambda z, loss: jnp.mean(_row_max_lse(z, inv_t)),
                      z, jnp.mean(c + c_max + jnp.log(r)))
  return loss, _SharedShiftResiduals(z, e, c, w, 1.0 / r, ok)


def _mean_nlse_bwd(temperature, shared_shift, residuals, g):
  del shared_shift  # the residuals' type says which path the forward took
  inv_t = 1.0 / temperature
  z = residuals.z
  n = z.shape[0]
  block = _row_blocks(n)
  rows = lambda v, off: jax.lax.dynamic_slice_in_dim(v, off, block)

  if isinstance(residuals, _RowMaxResiduals):
    if residuals.s is not None:
      grad = _row_max_sym_softmax_times_z(residuals.s, residuals.lse, residuals.lse, z)
    else:
      grad = _row_max_grad(z, residuals.lse, inv_t)
    return (grad * (g * inv_t / n),)

  _, e, c, w, inv_r, ok = residuals

  def sym_softmax_times_z(e_rows, w_rows, inv_r_rows):
    q = e_rows * (inv_r_rows[:, None] * w[None, :] + w_rows[:, None] * inv_r[None, :])
    return q @ z

  if e is not None:
    grad = sym_softmax_times_z(e, w, inv_r)
  else:
    grad = _blockwise(lambda zb, off: sym_softmax_times_z(
        _shared_shift_kernel(zb, z, rows(c, off), c, off, inv_t), rows(w, off), rows(inv_r, off)),
        z, block)
  grad = jax.lax.cond(ok, lambda z, grad: grad,
                      lambda z, grad: _row_max_grad(z, _row_max_lse(z, inv_t), inv_t), z, grad)
  return (grad * (g * inv_t / n),)


_mean_nlse.defvjp(_mean_nlse_fwd, _mean_nlse_bwd)


def alignment(z1, z2, temperature) -> jax.Array:
  """Invariance part of NT-Xent: mean over the B positive pairs of -z1_i.z2_i / tau."""
  _check_pair("alignment", z1, z2)
  t = _check_temperature("alignment", temperature)
  dt = _compute_dtype(z1)
  return -jnp.mean(jnp.sum(z1.astype(dt) * z2.astype(dt), axis=-1)) / t


def uniformity(z1, z2, temperature) -> jax.Array:
  """Negatives part of NT-Xent: mean over 2B anchors of logsumexp_{j != i} z_i.z_j / tau."""
  _check_pair("uniformity", z1, z2)
  t = _check_temperature("uniformity", temperature)
  dt = _compute_dtype(z1)
  z = jnp.concatenate([z1, z2], axis=0).astype(dt)
  return _mean_negative_logsumexp(z, t)


def info_nce(z1, z2, temperature) -> jax.Array:
  """SimCLR's NT-Xent loss: 2B anchors, positive = the other view, 2B - 2 negatives.

  Equals alignment(z1, z2, t) + uniformity(z1, z2, t) exactly (it is computed as
  that sum), in the logsumexp form.
  """
  return alignment(z1, z2, temperature) + uniformity(z1, z2, temperature)


def wang_isola_uniformity(z, temperature: float = 1.0) -> jax.Array:
  """The paper's L_unif: log mean_{i != j} exp(z_i . z_j / tau) over the rows of z."""
  _check_rows("wang_isola_uniformity: z", z)
  t = _check_temperature("wang_isola_uniformity", temperature)
  n = z.shape[0]
  if n < 2:
    raise ValueError(f"wang_isola_uniformity: z needs at least 2 rows, got {n}")
  # mean_i lse_{j != i} S_ij is not lse over all pairs, so use the plain form:
  # logsumexp over all off-diagonal entries minus log of their count.
  z = z.astype(_compute_dtype(z))
  s = _masked_similarity(z, z, 0, 1.0 / t)
  return jax.nn.logsumexp(s) - jnp.log(float(n * (n - 1)))


def moco_info_nce(q, k, queue, temperature) -> jax.Array:
  """MoCo-v2 InfoNCE: positive q_i.k_i, negatives q_i.queue_j; keys and queue get no gradient."""
  _check_pair("moco_info_nce", q, k, names=("q", "k"))
  _check_rows("moco_info_nce: queue", queue)
  if queue.shape[1] != q.shape[1]:
    raise ValueError(f"moco_info_nce: queue rows must have D={q.shape[1]} like q, got queue shape {queue.shape}")
  t = _check_temperature("moco_info_nce", temperature)
  dt = _compute_dtype(q)
  q = q.astype(dt)
  k = jax.lax.stop_gradient(k).astype(dt)
  queue = jax.lax.stop_gradient(queue).astype(dt)
  pos = jnp.sum(q * k, axis=-1, keepdims=True) / t
  neg = (q @ queue.T) / t
  return jnp.mean(jax.nn.logsumexp(jnp.concatenate([pos, neg], axis=1), axis=1) - pos[:, 0])


def minkowski_inner(x, y) -> jax.Array:
  """Pairwise Lorentz products <x_i, y_j>_L = -x_i0 y_j0 + sum_k>0 x_ik y_jk: [N, M]."""
  sign = jnp.ones((x.shape[-1],), x.dtype).at[0].set(-1)
  return (x * sign) @ y.T


def hyperbolic_info_nce(z1, z2, temperature, eps: float = 1e-5) -> jax.Array:
  """NT-Xent on the hyperboloid: similarity = -d(z_i, z_j) / tau, d the geodesic distance.

  Rows are points of the Lorentz model (<z, z>_L = -1, z_0 > 0, the time
  coordinate first); d = arccosh(-<z_i, z_j>_L). The argument is clamped at
  1 + eps: rounding puts near-equal points just below 1, where arccosh is
  undefined and its slope infinite (the clamp bounds it at 1/sqrt(2 eps)).
  Same anchors and positives as info_nce: 2B anchors, the other view positive.
  """
  _check_pair("hyperbolic_info_nce", z1, z2)
  t = _check_temperature("hyperbolic_info_nce", temperature)
  dt = _compute_dtype(z1)
  z = jnp.concatenate([z1, z2], axis=0).astype(dt)
  n, b = z.shape[0], z1.shape[0]
  dist = jnp.arccosh(jnp.maximum(-minkowski_inner(z, z), 1.0 + eps))
  s = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, -dist / t)
  positive = jnp.take_along_axis(s, ((jnp.arange(n) + b) % n)[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(s, axis=1) - positive)


# --------------------------------------------------------------------------
# Equivariance loss
# --------------------------------------------------------------------------

def bilinear_form(form: Form, dim: int, dtype=jnp.float32) -> Optional[jax.Array]:
  """The matrix J of <x, y>_J = x^T J y; None stands for the dot product.

  form: None / 'dot' (rotations, SO(d)), 'minkowski' (J = diag(-1, 1, ..., 1),
  the Lorentz group), 'symplectic' (J = [[0, I], [-I, 0]], even dim), or a
  [dim, dim] matrix.
  """
  if form is None or (isinstance(form, str) and form in ("dot", "euclidean")):
    return None
  if isinstance(form, str):
    if form == "minkowski":
      return jnp.diag(jnp.ones((dim,), dtype).at[0].set(-1))
    if form == "symplectic":
      if dim % 2:
        raise ValueError(f"bilinear_form: 'symplectic' needs an even dimension, got D={dim}")
      h = dim // 2
      eye = jnp.eye(h, dtype=dtype)
      zero = jnp.zeros((h, h), dtype)
      return jnp.block([[zero, eye], [-eye, zero]])
    raise ValueError(f"bilinear_form: unknown form {form!r}; use None, 'dot', 'minkowski', "
                     "'symplectic' or a [D, D] matrix")
  j = jnp.asarray(form, dtype)
  if j.shape != (dim, dim):
    raise ValueError(f"bilinear_form: form matrix must be [D, D] = [{dim}, {dim}], got {j.shape}")
  return j


@jax.custom_vjp
def _offdiag_sq_gram_diff_dot(a, b):
  """The direct path for the dot product, with its gradient written out.

  With D = G1 - G2 (diagonal zeroed, symmetric), d/dA sum D^2 = 4 D A and
  d/dB = -4 D B: two batched products, where autodiff of the two Gram
  products spends four (it does not know D is symmetric). Measured 0.20 ->
  0.11 ms forward+backward at B = 256, 16 chunks on XLA:CPU (2 cores).
  """
  return _offdiag_sq_gram_diff_dot_fwd(a, b)[0]


def _offdiag_sq_gram_diff_dot_fwd(a, b):
  diff = jnp.einsum("knd,kmd->knm", a, a) - jnp.einsum("knd,kmd->knm", b, b)
  diff = jnp.where(jnp.eye(a.shape[1], dtype=bool), 0.0, diff)
  return jnp.sum(diff * diff, axis=(1, 2)), (a, b, diff)


def _offdiag_sq_gram_diff_dot_bwd(residuals, g):
  a, b, diff = residuals
  scaled = diff * (4.0 * g)[:, None, None]
  return jnp.einsum("knm,kmd->knd", scaled, a), -jnp.einsum("knm,kmd->knd", scaled, b)


_offdiag_sq_gram_diff_dot.defvjp(_offdiag_sq_gram_diff_dot_fwd, _offdiag_sq_gram_diff_dot_bwd)


def _offdiag_sq_gram_diff_direct(a, b, j):
  """sum_{i != j} (G1 - G2)_ij^2 per chunk, forming the n x n Gram matrices: O(n^2 D)."""
  if j is None:
    return _offdiag_sq_gram_diff_dot(a, b)
  aj, bj = a @ j, b @ j
  diff = jnp.einsum("knd,kmd->knm", aj, a) - jnp.einsum("knd,kmd->knm", bj, b)
  n = a.shape[1]
  diff = jnp.where(jnp.eye(n, dtype=bool), 0.0, diff)
  return jnp.sum(diff * diff, axis=(1, 2))


@jax.custom_vjp
def _offdiag_sq_gram_diff_covariance_dot(a, b):
  """The covariance path for the dot product, as one 2D-wide product each way.

  With Y = [A | B] (n x 2D) and C = Y^T Y = [[Ca, Cab], [Cab^T, Cb]],
  ||A A^T - B B^T||^2 = sum(sign * C * C), sign = +1 on the diagonal blocks
  and -1 off them, and its gradient is 4 Y (sign * C): d/dA = 4 (A Ca -
  B Cab^T), d/dB = 4 (B Cb - A Cab). The diagonal's share, sum_i (|a_i|^2 -
  |b_i|^2)^2, is taken off with its gradient. Autodiff of the three covariance
  products spends nine D x n x D products; this spends two of twice the width.
  Measured forward+backward on XLA:CPU (2 cores), one chunk of n = 256 rows,
  D = 128: 1.01 -> 0.67 ms (three products forward and this backward: 0.70).
  """
  return _offdiag_sq_gram_diff_covariance_dot_fwd(a, b)[0]


def _offdiag_sq_gram_diff_covariance_dot_fwd(a, b):
  d = a.shape[-1]
  y = jnp.concatenate([a, b], axis=-1)
  c = jnp.einsum("knd,kne->kde", y, y)
  in_a = jnp.arange(2 * d) < d
  signed_c = jnp.where(in_a[:, None] == in_a[None, :], c, -c)
  diag = jnp.sum(a * a, axis=-1) - jnp.sum(b * b, axis=-1)
  total = jnp.sum(signed_c * c, axis=(1, 2)) - jnp.sum(diag * diag, axis=-1)
  return total, (y, signed_c, diag)


def _offdiag_sq_gram_diff_covariance_dot_bwd(residuals, g):
  y, signed_c, diag = residuals
  d = y.shape[-1] // 2
  grad_y = jnp.einsum("knd,kde->kne", y, signed_c) * (4.0 * g)[:, None, None]
  diag_share = (diag * (4.0 * g)[:, None])[..., None]
  a, b = y[..., :d], y[..., d:]
  return grad_y[..., :d] - diag_share * a, grad_y[..., d:] + diag_share * b


_offdiag_sq_gram_diff_covariance_dot.defvjp(_offdiag_sq_gram_diff_covariance_dot_fwd,
                                            _offdiag_sq_gram_diff_covariance_dot_bwd)


def _offdiag_sq_gram_diff_covariance(a, b, j):
  """The same through D x D matrices: O(n D^2), for chunks larger than D.

  ||A J A^T - B J B^T||_F^2 = <J^T Ca J, Ca> + <J^T Cb J, Cb> - 2 <J^T Cab J, Cab>
  with Ca = A^T A, Cb = B^T B, Cab = A^T B; then the diagonal's share,
  sum_i (a_i^T J a_i - b_i^T J b_i)^2, is taken off.
  """
  if j is None:
    return _offdiag_sq_gram_diff_covariance_dot(a, b)
  ca = jnp.einsum("knd,kne->kde", a, a)
  cb = jnp.einsum("knd,kne->kde", b, b)
  cab = jnp.einsum("knd,kne->kde", a, b)
  sandwich = lambda c: jnp.einsum("dk,bde,el->bkl", j, c, j)
  aj, bj = a @ j, b @ j
  total = (jnp.sum(sandwich(ca) * ca, axis=(1, 2)) + jnp.sum(sandwich(cb) * cb, axis=(1, 2))
           - 2.0 * jnp.sum(sandwich(cab) * cab, axis=(1, 2)))
  diag = jnp.sum(aj * a, axis=-1) - jnp.sum(bj * b, axis=-1)
  return total - jnp.sum(diag * diag, axis=-1)


def equivariance_loss(z1, z2, num_chunks: int, form: Form = None) -> jax.Array:
  """CARE's L_equi: how far one augmentation pair is from preserving all inner products.

  The batch holds num_chunks chunks of n = B / num_chunks rows (chunk k = rows
  [k n, (k+1) n)); within a chunk every image of z1 saw one augmentation and
  every image of z2 another. Per chunk, with G = Z J Z^T,
      2/n * sum_{i != j} (G1_ij - G2_ij)^2,
  averaged over chunks. A pair related by one map R with R^T J R = J (a
  rotation for the dot product) scores exactly 0. Chunks larger than D use the
  O(n D^2) covariance identity; both paths agree within float tolerance.
  """
  _check_pair("equivariance_loss", z1, z2)
  b, d = z1.shape
  num_chunks = int(num_chunks)
  if num_chunks < 1 or b % num_chunks:
    raise ValueError(f"equivariance_loss: batch size B={b} is not divisible by num_chunks={num_chunks}; "
                     "choose num_chunks dividing B")
  n = b // num_chunks
  if n < 2:
    raise ValueError(f"equivariance_loss: chunk size n=B/num_chunks={b}/{num_chunks}={n} is below 2; "
                     "use fewer chunks")
  dt = _compute_dtype(z1)
  j = bilinear_form(form, d, dt)
  a = z1.astype(dt).reshape(num_chunks, n, d)
  c = z2.astype(dt).reshape(num_chunks, n, d)
  kernel = _offdiag_sq_gram_diff_covariance if n > d else _offdiag_sq_gram_diff_direct
  return jnp.mean(kernel(a, c, j)) * (2.0 / n)


# --------------------------------------------------------------------------
# CARE
# --------------------------------------------------------------------------

def care_loss(z1, z2, e1=None, e2=None, *, temperature: float, equiv_weight: float,
              num_chunks: int = 1, form: Form = None):
  """L_CARE = InfoNCE(z1, z2) + equiv_weight * equivariance_loss(e1, e2).

  z1, z2: the per-image views; e1, e2: the chunk-shared views. With
  equiv_weight == 0 (SimCLR) e1/e2 may be None and the term is not computed.
  Returns (total, terms) with terms = dict(info_nce, alignment, uniformity,
  equivariance), all float32 scalars, for logging.
  """
  align = alignment(z1, z2, temperature)
  unif = uniformity(z1, z2, temperature)
  if e1 is None or e2 is None:
    if equiv_weight:
      raise ValueError("care_loss: equiv_weight is non-zero but e1/e2 were not given")
    equi = jnp.zeros((), align.dtype)
  else:
    equi = equivariance_loss(e1, e2, num_chunks, form)
  nce = align + unif
  total = nce + equiv_weight * equi
  return total, dict(info_nce=nce, alignment=align, uniformity=unif, equivariance=equi)
