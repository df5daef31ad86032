"""Benchmark: CARE loss forward+backward against the reference formulation.

    python -m experiments.bench_losses            # full grid
    python -m experiments.bench_losses --quick    # B <= 1024 (what `make demo` ran first)

One table: kernel, B, D, chunks, device, median ms of forward+backward, the
baseline's median ms and the speed-up over it, the floor and the kernel as a
multiple of the floor. Everything is measured in the same run, in interleaved
rounds, and the two ratio columns are paired: the median over rounds of the
ratio within a round, so they hold on a noisy shared machine.

Baseline: a PyTorch transcription of the reference release's algorithm
(NT-Xent as exp then log over a masked_select of the similarity matrix, the
negative mask built with a Python loop on every call, the equivariance loss in
a per-chunk Python loop with a masked_select per chunk), on the same device as
JAX where PyTorch sees it. Without PyTorch: the same algorithm as a per-chunk
NumPy loop with hand-written gradients.

Floor: the two [2B, D] x [D, 2B] matrix products that any exact InfoNCE
forward+backward needs (one for the similarities, one for their gradient).
"""

from __future__ import annotations

import os

# PyTorch's OpenMP workers spin after each parallel region by default and steal
# the cores from the JAX call timed right after them; make them sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# On a GPU the PyTorch baseline shares the device with JAX in this process:
# JAX allocates on demand instead of taking 75% of the device at start, and
# the baseline runs where the device's free memory holds it (else "(mem)").
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from care_jax import losses  # noqa: E402
from experiments import torch_reference as torch_reference_lib  # noqa: E402

TEMPERATURE = 0.5
EQUIV_WEIGHT = 0.03


def _interleaved_rounds(fns: dict, rounds: int, budget_s: float = 20.0,
                        burst_s: float = 0.01) -> dict:
  """Ms per call of each callable in every one of the interleaved rounds.

  The machines are shared and noisy: timing candidates one after another lets
  a burst of load land on one of them. Round-robin rounds give every
  candidate the same conditions, so the ratios stay meaningful. Within a
  round a candidate runs back to back for at least burst_s (after one untimed
  call) and scores its mean per call: a single 1 ms call timed right after a
  9 ms PyTorch call, or even after a 9 ms sleep, measured 1.4-1.5 ms instead
  of its steady 1.05 ms on this VM (idle cores clock down and XLA's worker
  threads park), a cost a training loop calling the loss back to back never
  pays. Every candidate, the baseline included, is timed the same way.
  """
  for fn in fns.values():
    fn()  # compile / warm up
  times = {name: [] for name in fns}
  start = time.perf_counter()
  for r in range(rounds):
    for name, fn in fns.items():
      fn()
      calls, t0 = 0, time.perf_counter()
      while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= burst_s and calls >= 2:
          break
      times[name].append(elapsed * 1e3 / calls)
    if r >= 2 and time.perf_counter() - start > budget_s:
      break
  return times


def _paired_ratio(times: dict, num: str, den: str) -> float:
  """Median over rounds of num's time / den's time in the same round.

  A burst of load from another tenant lasts longer than one round, so both
  candidates of a round see it; the per-round ratio cancels it where the
  ratio of two medians, taken over different rounds, does not.
  """
  return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _inputs(b, d, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(4):
    x = rng.normal(size=(b, d)).astype(np.float32)
    out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
  return out


# ------------------------------------------------------------------ JAX


def jax_care_step(num_chunks):
  def loss(z1, z2, e1, e2):
    return losses.care_loss(z1, z2, e1, e2, temperature=TEMPERATURE,
                            equiv_weight=EQUIV_WEIGHT, num_chunks=num_chunks)[0]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def jax_floor():
  # Two independent products so XLA cannot share them.
  return jax.jit(lambda a, b: (a @ a.T, b @ b.T))


# ------------------------------------------------------------------ baselines


def torch_reference(torch, device):
  """The release's loss algorithm (experiments/torch_reference.py), timed forward+backward."""
  care = torch_reference_lib.care_loss_fn(torch, device, TEMPERATURE, EQUIV_WEIGHT)

  def make(arrays, num_chunks):
    ts = [torch.tensor(x, device=device, requires_grad=True) for x in arrays]

    def step():
      for t in ts:
        t.grad = None
      care(*ts, num_chunks).backward()
      if device.type == "cuda":
        torch.cuda.synchronize()
    return step

  return make


def numpy_reference(arrays, num_chunks):
  """The same algorithm in NumPy, per-chunk loop, hand-written gradients."""
  z1, z2, e1, e2 = arrays

  def step():
    b = z1.shape[0]
    z = np.concatenate([z1, z2])
    mask = np.ones((2 * b, 2 * b), bool)
    for i in range(2 * b):
      mask[i, i] = False
    e = np.exp(z @ z.T / TEMPERATURE) * mask
    p = e / e.sum(axis=1, keepdims=True)
    swapped = np.concatenate([z2, z1])
    loss = np.mean(np.log(e.sum(axis=1)) - np.sum(z * swapped, 1) / TEMPERATURE)
    grad_z = ((p + p.T) @ z - 2 * swapped) / (2 * b * TEMPERATURE)
    n = b // num_chunks
    g1, g2 = np.zeros_like(e1), np.zeros_like(e2)
    for k in range(num_chunks):
      a, c = e1[k * n:(k + 1) * n], e2[k * n:(k + 1) * n]
      diff = a @ a.T - c @ c.T
      np.fill_diagonal(diff, 0.0)
      loss += EQUIV_WEIGHT / num_chunks * 2.0 / n * np.sum(diff ** 2)
      scale = EQUIV_WEIGHT / num_chunks * 2.0 / n * 4.0
      g1[k * n:(k + 1) * n] = scale * diff @ a
      g2[k * n:(k + 1) * n] = -scale * diff @ c
    return loss, grad_z, g1, g2

  return step


def _reference_bytes(b):
  # exp(S), the bool mask, the masked copy and their gradients: ~4 float32
  # [2B, 2B] buffers at peak.
  return 4 * 4 * (2 * b) ** 2


def _free_bytes(torch=None, device=None):
  """Free memory where the baseline runs: the GPU's, else the host's."""
  if torch is not None and device is not None and device.type == "cuda":
    return torch.cuda.mem_get_info(device)[0]
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 1 << 62


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="only B <= 1024")
  parser.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024, 4096, 16384])
  parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[16, 256])
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=100, help="interleaved timing rounds (capped at ~20 s a row)")
  args = parser.parse_args(argv)
  batch_sizes = [b for b in args.batch_sizes if not args.quick or b <= 1024]
  # Bad sizes are one line (argparse's usage, then the error) before any timing.
  if not batch_sizes:
    parser.error("no batch size left to time (--quick keeps B <= 1024); give --batch-sizes 256 1024")
  if min(batch_sizes) < 2 or min(args.chunk_sizes, default=2) < 2:
    parser.error("--batch-sizes and --chunk-sizes must be >= 2 (InfoNCE needs negatives, L_equi pairs in a chunk)")
  for b in batch_sizes:
    for n in args.chunk_sizes:
      if n <= b and b % n:
        parser.error(f"--chunk-sizes {n} does not divide --batch-sizes {b}; give chunk sizes that divide every "
                     "batch size (powers of two do)")
  if args.dim < 2 or args.rounds < 1:
    parser.error(f"--dim must be >= 2 and --rounds >= 1 (got {args.dim}, {args.rounds})")

  dev = jax.devices()[0]
  device_name = f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":")
  torch = torch_reference_lib.torch_module()
  tdev = None
  if torch is not None:
    tdev = torch.device("cuda" if dev.platform == "gpu" and torch.cuda.is_available() else "cpu")
    make_torch = torch_reference(torch, tdev)
    baseline_name = f"torch {torch.__version__} ({tdev.type})"
  else:
    baseline_name = "numpy per-chunk loop"
  print(f"# CARE loss forward+backward, D={args.dim}, tau={TEMPERATURE}, lambda={EQUIV_WEIGHT}; "
        f"jax {jax.__version__} on {device_name}; baseline: {baseline_name}")
  header = (f"{'kernel':<8} {'B':>6} {'D':>4} {'chunks':>6} {'n':>4} {'device':<14} {'jax ms':>9} "
            f"{'base ms':>9} {'speed-up':>8} {'floor ms':>9} {'x floor':>7}")
  print(header)
  print("-" * len(header))
  floor_fn = jax_floor()
  for b in batch_sizes:
    arrays = _inputs(b, args.dim)
    dev_arrays = [jnp.asarray(x) for x in arrays]
    zz = jnp.concatenate(dev_arrays[:2])
    yy = jnp.concatenate(dev_arrays[2:])
    for n in args.chunk_sizes:
      if n > b:
        continue
      k = b // n
      step = jax_care_step(k)
      fns = {"jax": lambda: jax.block_until_ready(step(*dev_arrays)),
             "floor": lambda: jax.block_until_ready(floor_fn(zz, yy))}
      with_baseline = _reference_bytes(b) <= 0.6 * _free_bytes(torch, tdev)
      if with_baseline:
        fns["base"] = make_torch(arrays, k) if torch is not None else numpy_reference(arrays, k)
      times = _interleaved_rounds(fns, args.rounds if b <= 4096 else 3)
      ms = {name: statistics.median(v) for name, v in times.items()}
      base = f"{ms['base']:9.2f}" if with_baseline else "    (mem)"
      speed = f"{_paired_ratio(times, 'base', 'jax'):7.1f}x" if with_baseline else "       -"
      print(f"{'care':<8} {b:>6} {args.dim:>4} {k:>6} {n:>4} {device_name:<14} {ms['jax']:9.2f} "
            f"{base:>9} {speed:>8} {ms['floor']:9.2f} {_paired_ratio(times, 'jax', 'floor'):6.2f}x",
            flush=True)

if __name__ == "__main__":
  main()
