"""Benchmark: the CARE train step (4 views, forward + backward + Adam) against the PyTorch reference.

    python -m experiments.bench_train_step            # accelerator grid: ResNet-18/50, B 256/512/1024, fp32/bf16
    python -m experiments.bench_train_step --quick    # CPU-sized: ResNet-18 width 0.125, B 256, fp32
    python -m experiments.bench_train_step --rows resnet50:512:bfloat16:device   # just these rows

One row per (model, B, dtype, augmentation, view batching): median step ms, images/s, the
model's FLOPs per image (XLA's cost analysis of the compiled step's HLO before
optimisation, see model_flops), MFU against the
device's dense bf16 peak (where known), XLA's bytes accessed per image and
that traffic's time at the device's HBM bandwidth (a lower bound on the step:
a step near it is memory-bound), and the PyTorch reference's step ms
and images/s on the same device in the same run with the speed-up over it.

augmentation 'views': the four float views are given (what the tf.data
pipeline feeds); 'device': uint8 images go in and care_jax/augment_jax.py
makes the views inside the compiled step (the config's augment_backend=device).
views 'sequential': four forward passes (the release); 'batched': one pass over
the views interleaved along the batch (config view_batching; same loss,
gradients and BN statistics).
The reference is experiments/torch_reference.py: the release's step (four
forward passes, its loss formulation, Adam, fp32 eager); it is timed once per
(model, B) with given views, as the release feeds it from a DataLoader.
Memory: both frameworks share one GPU in this process, so all the references
are timed first, each freeing what it held, and JAX allocates on demand
(XLA_PYTHON_CLIENT_PREALLOCATE=false) instead of taking 75% of the device at
start. A row that runs out of device memory prints "(mem)" and the run goes on;
a row (or reference) that fails otherwise prints "failed:" and its error's
first line, its traceback goes to stderr, the other rows still run (a short
GPU lease keeps what did run) and the exit status is 1.
The CIFAR-10 CARE config (configs/cifar10_care.py) supplies everything else.
Timings: steps run back to back, the clock read after blocking on the last
one, median of --repeats windows; only the ratios of one run are comparable.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # see the docstring: one GPU, two frameworks

import argparse  # noqa: E402
import gc  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from care_jax import config_lib, train  # noqa: E402
from care_jax import augment_config  # noqa: E402
from experiments import torch_reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (device_kind substring, dense bf16 tensor-core peak FLOP/s, HBM bytes/s), first
# match wins (so the H100 PCIe and NVL before the SXM H100); "-" where unknown.
DEVICE_SPECS = (("H100PCIE", 756e12, 2.0e12), ("H100NVL", 835e12, 3.9e12), ("H200", 989e12, 4.8e12),
                ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12), ("L4", 121e12, 0.3e12),
                ("V5LITE", 197e12, 0.82e12), ("V4", 275e12, 1.2e12))


def _device_spec(device) -> tuple:
  """(bf16 peak FLOP/s, HBM bytes/s) of the device, (None, None) where unknown (CPUs)."""
  kind = getattr(device, "device_kind", "").upper().replace(" ", "")
  return next(((peak, bw) for k, peak, bw in DEVICE_SPECS if k in kind), (None, None))


def _config(model: str, width: float, batch: int, dtype: str, augment: str, view_batching: str = "sequential"):
  c = config_lib.load_config_file(ROOT / "configs" / "cifar10_care.py")
  c.model, c.model_width, c.batch_size, c.dtype = model, width, batch, dtype
  c.view_batching = view_batching
  # One pair per chunk (design.md's sampling; the config follows the release's one per
  # step): the more sampling work, and the step every figure in the README was taken on.
  c.equiv_augment_pairs = 0
  # crop_and_resize's bilinear taps (the config resamples as torchvision): the same
  # einsum shapes, the resampling the README's figures were taken with.
  c.resize_antialias = False
  # One BatchNorm over the batch, as the PyTorch reference on one GPU (the config's
  # bn_groups=2 reproduces the release's two-GPU DataParallel statistics).
  c.bn_groups = 1
  c.augment_backend = "device" if augment == "device" else "tf"
  c.num_train_steps = 1000
  config_lib.validate(c, jax.device_count())
  return c


def check_rows(program: str, rows, width: float) -> None:
  """Every row as a config before any is timed or traced: a bad one (or width) ends the run with one line."""
  for row in rows:
    try:
      _config(row[0], width, *row[1:])
    except config_lib.ConfigError as err:
      raise SystemExit(f"{program}: row {':'.join(map(str, row))}: {err}") from None


def input_structs(config, mesh) -> dict:
  """A row's batch as ShapeDtypeStructs: uint8 images for on-device augmentation, else the four float32 views."""
  sharding = NamedSharding(mesh, P("data"))
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  if config.augment_backend == "device":
    return {"images": jax.ShapeDtypeStruct(shape, np.uint8, sharding=sharding)}
  return {v: jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding) for v in train.VIEWS}


def _inputs(config, mesh, seed=0):
  rng = np.random.default_rng(seed)
  to_global = train.global_batch_builder(mesh)
  fill = lambda s: (rng.integers(0, 256, s.shape, dtype=np.uint8) if s.dtype == np.uint8
                    else rng.normal(size=s.shape).astype(np.float32))
  return {k: to_global(fill(s)) for k, s in input_structs(config, mesh).items()}


def _timed_windows(run_steps, steps: int, repeats: int) -> float:
  """Median ms per step over `repeats` windows of `steps` back-to-back steps."""
  run_steps(2)  # warm-up (compiled already)
  per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run_steps(steps)
    per_step.append((time.perf_counter() - t0) * 1e3 / steps)
  return statistics.median(per_step)


def model_flops(lowered) -> float | None:
  """The FLOPs of a lowered step as written: what MFU divides by peak.

  XLA's cost analysis of the step's HLO before optimisation, run by the host's
  CPU client so that every backend counts the same program the same way. The
  compiled step's own analysis is the wrong count on a GPU: after
  optimisation its convolutions are cuDNN custom calls, and jax's PJRT
  plugins do not analyse a Lowered at all. None where this jax lacks the
  (private) entry point; the caller then falls back to the compiled count.
  """
  try:
    return float(host_cost_analysis(lowered.compiler_ir("hlo").get_hlo_module())["flops"])
  except Exception:  # noqa: BLE001 (any failure here only loses the better count)
    return None


def compiled_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program (per device), as one dict; {} where the backend has none."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def host_cost_analysis(hlo_module) -> dict:
  """XLA's cost analysis of an HLO module (any backend's) by the host's CPU client."""
  from jax._src.lib import xla_client  # noqa: PLC0415 (private: callers guard or need it)

  return xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo_module)


def model_and_step(config) -> tuple:
  """(model, optimizer, uncompiled train step) of a benchmark row's config."""
  model = train.build_model(config)
  schedule = train.learning_rate_schedule(config, config_lib.resolve_durations(config, 50000))
  tx = train.make_optimizer(config, schedule)
  step_fn = train.make_train_step(model, tx, config, schedule)
  if config.augment_backend == "device":
    step_fn = train.with_device_augmentation(step_fn, config, augment_config.from_config(config))
  return model, tx, step_fn


def compiled_step(config) -> tuple:
  """(lowered, compiled, state, batch): a row's step compiled for all devices, its state placed for it
  and a random batch; what the timing here and experiments/profile_step.py run."""
  mesh = train.make_mesh()
  model, tx, step_fn = model_and_step(config)
  state = train.create_train_state(model, tx, config, mesh)
  batch = _inputs(config, mesh)
  lowered = train.lower_train_step(step_fn, mesh, state, batch)
  compiled = lowered.compile()
  return lowered, compiled, train.to_state_layouts(state, compiled), batch


def jax_row(config, steps: int, repeats: int) -> dict:
  lowered, compiled, state, batch = compiled_step(config)
  cost = compiled_cost(compiled)
  flops = model_flops(lowered)
  if flops is None:
    flops = float(cost.get("flops", 0.0))
  # XLA's count of bytes its ops read and write (fusions' operands and outputs):
  # over the HBM bandwidth, a lower bound on the step time from memory traffic.
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  holder = {"state": state}

  def run(n):
    s = holder["state"]
    with jax.transfer_guard("disallow"):  # as in the training loop: a timed step moves no data implicitly
      for _ in range(n):
        s, metrics = compiled(s, batch)
    jax.block_until_ready(metrics["loss"])
    holder["state"] = s

  ms = _timed_windows(run, steps, repeats)
  return {"ms": ms, "flops_per_image": flops / config.batch_size, "flops_per_step": flops,
          "bytes_per_step": bytes_accessed}


def torch_row(torch, config, steps: int, repeats: int):
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = torch_reference.resnet_model(torch, config.model, config.model_width, config.proj_hidden_dim,
                                       config.proj_dim).to(device)
  step = torch_reference.care_train_step(torch, device, model, temperature=config.temperature,
                                         equiv_weight=config.equiv_weight, num_chunks=config.equiv_splits,
                                         learning_rate=config.learning_rate, weight_decay=config.weight_decay)
  gen = torch.Generator(device="cpu").manual_seed(0)
  shape = (config.batch_size, 3, config.image_size, config.image_size)
  views = {v: torch.randn(shape, generator=gen).to(device) for v in train.VIEWS}

  def run(n):
    for _ in range(n):
      step(views)
    if device.type == "cuda":
      torch.cuda.synchronize()

  return _timed_windows(run, steps, repeats), device.type


def is_out_of_memory(err: BaseException) -> bool:
  """XLA's RESOURCE_EXHAUSTED or PyTorch's CUDA out-of-memory error."""
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


OUT_OF_MEMORY = "out of device memory"


def failure_note(err: BaseException) -> str:
  """What a table says of a row that raised: 'out of device memory', or 'failed: ' and the
  error's first line, with the traceback on stderr (a bug must not pass for a full device)."""
  if is_out_of_memory(err):
    return OUT_OF_MEMORY
  traceback.print_exception(err, file=sys.stderr)
  first = str(err).splitlines()[0][:160] if str(err) else ""
  return f"failed: {type(err).__name__}" + (f": {first}" if first else "")


def reference_rows(torch, pairs, width: float, steps: int, repeats: int) -> dict:
  """(model, B) -> the reference step's ms, or failure_note's note where it raised; printed as measured."""
  out = {}
  for model, batch in pairs:
    try:
      ms, device = torch_row(torch, _config(model, width, batch, "float32", "views"), steps, repeats)
      out[model, batch], note = ms, f"{ms:.1f} ms/step, {batch / ms * 1e3:.0f} img/s ({device})"
    except Exception as err:  # noqa: BLE001 (torch.OutOfMemoryError is one; the JAX rows still run)
      out[model, batch] = note = failure_note(err)
    # Hand the memory back before the next reference or the JAX rows run.
    gc.collect()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
    print(f"# reference {model} B={batch}: {note}", flush=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  on_cpu = jax.devices()[0].platform == "cpu"
  parser.add_argument("--quick", action="store_true", help="CPU-sized grid (the default on a CPU)")
  parser.add_argument("--models", nargs="*", default=None)
  parser.add_argument("--batch-sizes", type=int, nargs="*", default=None)
  parser.add_argument("--dtypes", nargs="*", default=None)
  parser.add_argument("--augment", nargs="*", default=["views", "device"], choices=["views", "device"])
  parser.add_argument("--view-batching", nargs="*", default=None, choices=config_lib.VIEW_BATCHINGS,
                      help="the four views as four passes (the release) or one batched pass")
  parser.add_argument("--width", type=float, default=None, help="ResNet width multiplier")
  parser.add_argument("--steps", type=int, default=None, help="steps per timing window")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--rows", nargs="*", default=None, metavar="MODEL:B:DTYPE:AUGMENT[:VIEWS]",
                      help="time just these rows, in this order (e.g. resnet18:512:bfloat16:device), "
                           "instead of the grid: what a short GPU lease affords")
  args = parser.parse_args(argv)
  quick = args.quick or on_cpu
  models = args.models or (["resnet18"] if quick else ["resnet18", "resnet50"])
  batch_sizes = args.batch_sizes or ([256] if quick else [256, 512, 1024])
  dtypes = args.dtypes or (["float32"] if quick else ["float32", "bfloat16"])
  width = args.width or (0.125 if quick else 1.0)
  steps = args.steps or (3 if quick else 20)
  view_modes = args.view_batching or (["sequential"] if quick else list(config_lib.VIEW_BATCHINGS))
  if args.rows:
    rows = [_parse_row(r) for r in args.rows]
  else:
    rows = [(m, b, d, a, v) for m in models for b in batch_sizes
            for d in dtypes for a in args.augment for v in view_modes]
  check_rows("bench_train_step", rows, width)  # before minutes of reference timing
  torch = None if args.no_torch else torch_reference.torch_module()

  dev = jax.devices()[0]
  peak, bandwidth = _device_spec(dev)
  print(f"# CARE train step (4 views, fwd+bwd+Adam), CIFAR 32x32, width {width}; jax {jax.__version__} on "
        f"{jax.device_count()} x {dev.device_kind}; bf16 peak {peak / 1e12 if peak else '-'} TFLOP/s, "
        f"HBM {bandwidth / 1e12 if bandwidth else '-'} TB/s; "
        f"baseline: {'torch ' + torch.__version__ if torch else 'none'}")
  header = (f"{'model':<9} {'B':>5} {'dtype':<8} {'augment':<7} {'views':<10} {'step ms':>9} {'img/s':>9} {'GFLOP/img':>9} "
            f"{'MFU':>6} {'MB/img':>7} {'HBM ms':>7} {'torch ms':>9} {'torch img/s':>11} {'speed-up':>8}")
  # (model, B) -> the reference's step ms, timed once per pair, all before the JAX rows.
  torch_ms = {} if torch is None else reference_rows(torch, dict.fromkeys((r[0], r[1]) for r in rows),
                                                       width, steps, args.repeats)
  failed = [f"reference {m} B={b}: {note}" for (m, b), note in torch_ms.items()
            if isinstance(note, str) and note != OUT_OF_MEMORY]
  print(header)
  print("-" * len(header))
  for model, batch, dtype, augment, views in rows:
    lead = f"{model:<9} {batch:>5} {dtype:<8} {augment:<7} {views:<10}"
    base_ms = torch_ms.get((model, batch))
    if isinstance(base_ms, str):  # the reference raised: '(mem)' or '(failed)' in its columns
      base, base_ms = f"{'(mem)' if base_ms == OUT_OF_MEMORY else '(failed)':>9} {'-':>11}", None
    else:
      base = f"{base_ms:9.1f} {batch / base_ms * 1e3:11.0f}" if base_ms is not None else f"{'-':>9} {'-':>11}"
    try:
      r = jax_row(_config(model, width, batch, dtype, augment, views), steps, args.repeats)
    except Exception as err:  # noqa: BLE001 (reported in the table; the other rows still run)
      r = failure_note(err)
    if isinstance(r, str):
      gc.collect()  # the failed row's buffers, which its traceback held until the except block ended
      if r != OUT_OF_MEMORY:
        failed.append(f"{model}:{batch}:{dtype}:{augment}:{views}: {r}")
        print(f"{lead} {r}", flush=True)
      else:
        print(f"{lead} {'(mem)':>9} {'-':>9} {'-':>9} {'-':>6} {'-':>7} {'-':>7} {base} {'-':>8}", flush=True)
      continue
    ips = batch / r["ms"] * 1e3
    mfu = f"{100 * r['flops_per_step'] / (r['ms'] / 1e3) / peak:5.1f}%" if peak else "     -"
    # The memory-traffic bound next to the step time: a step near it is bound by
    # HBM bandwidth (BatchNorm, ReLU and the optimizer's elementwise passes), not FLOPs.
    hbm_ms = f"{1e3 * r['bytes_per_step'] / bandwidth:7.1f}" if bandwidth else f"{'-':>7}"
    speed = f"{base_ms / r['ms']:7.2f}x" if base_ms is not None else f"{'-':>8}"
    print(f"{lead} {r['ms']:9.1f} {ips:9.0f} {r['flops_per_image'] / 1e9:9.3f} {mfu:>6} "
          f"{r['bytes_per_step'] / batch / 1e6:7.1f} {hbm_ms} {base} {speed}", flush=True)
  if failed:
    raise SystemExit(f"bench_train_step: {len(failed)} failed (tracebacks above on stderr): " + "; ".join(failed))


def _parse_row(text: str):
  """'resnet18:512:bfloat16:device[:batched]' -> (model, B, dtype, augment, views)."""
  parts = text.split(":")
  if len(parts) not in (4, 5):
    raise SystemExit(f"--rows: {text!r} is not MODEL:B:DTYPE:AUGMENT[:VIEWS], "
                     "e.g. resnet18:512:bfloat16:device")
  model, batch, dtype, augment = parts[:4]
  views = parts[4] if len(parts) == 5 else "sequential"
  if not batch.isdigit():
    raise SystemExit(f"--rows: batch size {batch!r} in {text!r} is not a positive integer")
  if augment not in ("views", "device"):
    raise SystemExit(f"--rows: augment {augment!r} in {text!r} must be 'views' or 'device'")
  if views not in config_lib.VIEW_BATCHINGS:
    raise SystemExit(f"--rows: views {views!r} in {text!r} must be one of {', '.join(config_lib.VIEW_BATCHINGS)}")
  return model, int(batch), dtype, augment, views


if __name__ == "__main__":
  main()
