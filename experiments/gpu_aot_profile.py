"""Static GPU profile of the CARE train step, compiled ahead of time for an H100 or H200 on a CPU host.

    make gpu-aot                                          # the default rows for an H200
    make gpu-aot GPU_AOT_ARGS="--target h100 --rows resnet50:512:bfloat16:device:batched"

XLA:GPU's compiler is in jax's CUDA PJRT plugin, and given a GpuTargetConfig
(experiments/gpu_targets/*.txtpb: SM version, SM count, bandwidth, cache) it
compiles for a GPU the host does not have: the same fusion, layout and
scheduling passes, with cuDNN convolutions left as unautotuned custom calls.
Nothing runs, so every figure below is a property of the compiled program,
not a measurement; what it answers is how many kernels one step launches,
whether anything in it makes the host wait, and how many bytes its kernels
move against how many FLOPs they do, i.e. which bound a step sits on.

Per row MODEL:B:DTYPE:AUGMENT[:VIEWS] (as in bench_train_step.py):
  kernels     launches per step: fusions, cuDNN convolutions, cuBLAS GEMMs, copies
  syncs       conditionals and while loops: XLA:GPU copies each predicate to the
              host and waits for the stream, stalling the queue behind it
  GFLOP/img   the model's FLOPs (XLA's cost analysis of the step before
              optimisation; backend-independent: what MFU counts) and, from
              the compiled step, the cuDNN convolutions' FLOPs from their
              shapes, which count every tap of a padded window as work (dense
              MACs), so they exceed the model's share of them
  MB/img      bytes the compiled kernels read and write (each launch's operands
              and results; cuDNN scratch excluded), next to XLA's own count of
              the compiled module, which counts a cuDNN call as 0 bytes
  FLOP ms     the model's FLOPs at the target's dense bf16 peak
  HBM ms      the bytes at the target's HBM bandwidth; a step cannot beat the
              larger of the two, and reaching 35% MFU needs FLOP ms / 0.35 above
              HBM ms plus launch and sync overheads
then per part of the step (named scopes in care_jax/train.py): kernels and MB.

Set-up (make gpu-aot does it): jax-cuda12-plugin and jax-cuda12-pjrt of the
locked jax version in .aot_site/, put on PYTHONPATH with JAX_PLATFORMS=cpu so
nothing probes for a GPU at start-up; no CUDA libraries are needed to compile.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import pathlib
import re
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ROOT / "experiments" / "gpu_targets"
DEFAULT_ROWS = ("resnet18:512:bfloat16:views", "resnet18:512:bfloat16:device",
                "resnet18:512:bfloat16:views:batched", "resnet18:512:float32:views")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# Instructions that launch nothing and move no bytes of their own.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
              "partition-id", "replica-id"}
_HOST_SYNCS = {"conditional", "while"}
_CONV_TARGETS = {"__cudnn$convForward": "forward", "__cudnn$convBackwardInput": "backward input",
                 "__cudnn$convBackwardFilter": "backward filter", "__cudnn$convBiasActivationForward": "forward"}
# Parts of the step, first match wins, on a kernel's op_name: the named scopes
# of care_jax/train.py, then the model's forward (jvp) and backward (transpose
# of the jvp) passes, sequential or batched over the views.
PARTS = (("augment", r"/augment/"), ("optimizer", r"/optimizer/"), ("guard & metrics", r"/guard_and_metrics/"),
         ("loss backward", r"transpose\(jvp\(loss\)"), ("loss forward", r"jvp\(loss\)"),
         ("model backward", r"transpose\(jvp\(ContrastiveModel"), ("model forward", r"ContrastiveModel"))


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str
  operands: list
  attributes: str

  def attribute(self, key: str) -> str | None:
    m = re.search(key + r'="([^"]*)"', self.attributes) or re.search(key + r"=([^,\s}]+)", self.attributes)
    return m.group(1) if m else None


def shape_dims(shape: str) -> list:
  """'(bf16[2,3]{1,0}, u8[0]{0})' -> [('bf16', (2, 3)), ('u8', (0,))]."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", shape) if dt in _DTYPE_BYTES]


def shape_bytes(shape: str, first_only: bool = False) -> int:
  parts = shape_dims(shape)[:1] if first_only else shape_dims(shape)
  return sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in parts)


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start] ('(' or '{')."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, i = 0, start
  while i < len(text):
    c = text[i]
    if c in pairs:
      depth += 1
    elif c in pairs.values():
      depth -= 1
      if depth == 0:
        return i + 1
    elif c == '"':
      i = text.index('"', i + 1)
    i += 1
  raise ValueError(f"unbalanced brackets in HLO line: {text[:120]}")


def parse_entry(hlo_text: str) -> list:
  """The ENTRY computation's instructions, in order (what the GPU runtime launches)."""
  lines = hlo_text.splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith("ENTRY ")), None)
  if start is None:
    raise ValueError("no ENTRY computation in the HLO text")
  out = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = ", line)
    if not m:
      continue
    rest = line[m.end():]
    shape_end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
    op = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if not op:
      continue
    args_end = _closing(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():args_end - 1])
    out.append(Instruction(m.group(1), op.group(1), shape, operands, rest[args_end:]))
  return out


def conv_flops(inst: Instruction, shapes: dict) -> float:
  """2 x MACs of a cuDNN convolution custom call, from its shapes.

  Every kind has the filter and the forward output y in hand: forward
  (x, w) -> y, backward input (dy, w) -> dx, backward filter (x, dy) -> dw,
  and each does the forward's MAC count, |y| x |w| / C_out.
  """
  kind = _CONV_TARGETS[inst.attribute("custom_call_target")]
  first = lambda s: shape_dims(s)[0][1]
  if kind == "forward":
    y, w = first(inst.shape), first(shapes[inst.operands[1]])
  elif kind == "backward input":
    y, w = first(shapes[inst.operands[0]]), first(shapes[inst.operands[1]])
  else:
    y, w = first(shapes[inst.operands[1]]), first(inst.shape)
  labels = inst.attribute("dim_labels")  # e.g. b01f_o01i->b01f: input, filter, output
  filter_labels = labels.split("_")[1].split("->")[0]
  c_out = w[filter_labels.index("o")]
  return 2.0 * math.prod(y) * math.prod(w) / c_out


def kernel_kind(inst: Instruction) -> str:
  if inst.opcode == "fusion":
    kind = inst.attribute("kind")
    if kind == "kCustom":
      return "fusion: triton gemm" if "gemm" in inst.attributes else "fusion: custom"
    return {"kLoop": "fusion: loop", "kInput": "fusion: reduction", "kOutput": "fusion: output"}.get(
        kind, f"fusion: {kind}")
  if inst.opcode == "custom-call":
    target = inst.attribute("custom_call_target") or "?"
    if target in _CONV_TARGETS:
      return f"cudnn conv {_CONV_TARGETS[target]}"
    return "cublas gemm" if "cublas" in target else f"custom-call {target}"
  return inst.opcode


def part_of_op_name(op_name: str) -> str:
  return next((part for part, pattern in PARTS if re.search(pattern, op_name)), "other")


def part_of(inst: Instruction) -> str:
  return part_of_op_name(inst.attribute("op_name") or "")


def profile(hlo_text: str) -> dict:
  """Counts and bytes of a compiled module's entry computation (see the module docstring)."""
  entry = parse_entry(hlo_text)
  shapes = {i.name: i.shape for i in entry}
  kinds, parts = collections.Counter(), collections.defaultdict(lambda: [0, 0.0])
  total_bytes, flops_conv, syncs, heaviest = 0.0, 0.0, [], []
  for inst in entry:
    if inst.opcode in _NO_KERNEL:
      continue
    if inst.opcode in _HOST_SYNCS:
      syncs.append(f"{inst.opcode} {inst.name} ({inst.attribute('op_name') or 'no op_name'})")
    # A custom call's results after the first are cuDNN / cuBLAS scratch, not data.
    moved = (shape_bytes(inst.shape, first_only=inst.opcode == "custom-call")
             + sum(shape_bytes(shapes[o]) for o in inst.operands if o in shapes))
    if inst.opcode == "custom-call" and inst.attribute("custom_call_target") in _CONV_TARGETS:
      flops_conv += conv_flops(inst, shapes)
    kind = kernel_kind(inst)
    kinds[kind] += 1
    part = parts[part_of(inst)]
    part[0] += 1
    part[1] += moved
    total_bytes += moved
    heaviest.append((moved, inst.name, kind, (inst.attribute("op_name") or "")[-90:]))
  heaviest.sort(reverse=True)
  return dict(kernels=sum(kinds.values()), kinds=dict(kinds.most_common()), syncs=syncs,
              bytes=total_bytes, conv_flops=flops_conv, parts=dict(parts), heaviest=heaviest[:8])


def target_topology(target: str):
  """Compile-only devices of one GPU described by experiments/gpu_targets/<target>.txtpb."""
  from jax.experimental import topologies  # noqa: PLC0415 (needs the CUDA plugin on the path)

  path = TARGETS / f"{target}.txtpb"
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=path.read_text(), topology="1x1x1")
  except Exception as err:  # noqa: BLE001 (a missing plugin surfaces as any of several errors)
    raise SystemExit(f"cannot compile for a GPU here ({str(err).splitlines()[0][:160]}); install "
                     "the CUDA plugin with `make gpu-aot`, which puts it in .aot_site/ and runs this "
                     "with PYTHONPATH=.aot_site JAX_PLATFORMS=cpu") from None


def compile_row(row, devices, equiv_batch: int = 0, bn_groups: int = 1) -> dict:
  """Lowers and compiles one row's train step for `devices`; no array is ever allocated.
  equiv_batch: the config's equiv_batch_size (0: e1, e2 for the whole batch)."""
  from care_jax import config_lib, train  # noqa: PLC0415
  from experiments import bench_train_step  # noqa: PLC0415

  model_name, batch, dtype, augment, views = row
  config = bench_train_step._config(model_name, 1.0, batch, dtype, augment, views)
  config.equiv_batch_size = equiv_batch
  config.bn_groups = bn_groups
  config_lib.validate(config, len(devices))
  mesh = train.make_mesh(devices)
  host_mesh = train.make_mesh(jax.devices("cpu")[:1])
  model, tx, step_fn = bench_train_step.model_and_step(config)
  replicated = NamedSharding(mesh, P())
  abstract = jax.eval_shape(lambda: train.create_train_state(model, tx, config, host_mesh))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
  lowered = train.lower_train_step(step_fn, mesh, state, bench_train_step.input_structs(config, mesh))
  t0 = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  # XLA's byte count of the compiled GPU module, analysed on the host's CPU
  # client (the GPU client that would do it does not exist here).
  compiled_cost = bench_train_step.host_cost_analysis(compiled.runtime_executable().hlo_modules()[0])
  return dict(compile_s=seconds, hlo=compiled.as_text(), model_flops=bench_train_step.model_flops(lowered) or 0.0,
              xla_bytes=float(compiled_cost.get("bytes accessed", 0.0)))


def target_spec(target: str) -> tuple:
  """(device name, bf16 peak FLOP/s, HBM bytes/s) of a target file."""
  from experiments.bench_train_step import DEVICE_SPECS  # noqa: PLC0415

  text = (TARGETS / f"{target}.txtpb").read_text()
  name = re.search(r'device_description_str: "([^"]*)"', text).group(1)
  bandwidth = float(re.search(r"memory_bandwidth: (\d+)", text).group(1))
  kind = name.upper().replace(" ", "")
  peak = next((p for k, p, _ in DEVICE_SPECS if k in kind), None)
  return name, peak, bandwidth


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", default="h200", choices=sorted(p.stem for p in TARGETS.glob("*.txtpb")),
                      help="a file in experiments/gpu_targets/")
  parser.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS), metavar="MODEL:B:DTYPE:AUGMENT[:VIEWS]")
  parser.add_argument("--dump", default=None, help="write each row's compiled HLO text into this folder")
  parser.add_argument("--top", type=int, default=0, help="also list the N kernels that move the most bytes")
  parser.add_argument("--equiv-batch-size", type=int, default=0,
                      help="images given e1, e2 (config equiv_batch_size; 0: the whole batch)")
  parser.add_argument("--bn-groups", type=int, default=1,
                      help="BatchNorm statistics per group of images (config bn_groups; 1: the whole batch)")
  args = parser.parse_args(argv)
  from experiments import bench_train_step  # noqa: PLC0415

  rows = [bench_train_step._parse_row(r) for r in args.rows]
  bench_train_step.check_rows("gpu_aot_profile", rows, 1.0)  # before the plugin loads or any row compiles
  name, peak, bandwidth = target_spec(args.target)
  devices = target_topology(args.target).devices
  print(f"# CARE train step compiled ahead of time for {len(devices)} x {name} (experiments/gpu_targets/"
        f"{args.target}.txtpb) by XLA:GPU of jax {jax.__version__} on a CPU host: compiled, not run; "
        f"bf16 peak {peak / 1e12:.0f} TFLOP/s, HBM {bandwidth / 1e12:.2f} TB/s; "
        f"equiv_batch_size {args.equiv_batch_size or 'the whole batch'}, bn_groups {args.bn_groups}")
  header = (f"{'model':<9} {'B':>5} {'dtype':<8} {'augment':<7} {'views':<10} {'compile s':>9} {'kernels':>7} "
            f"{'convs':>5} {'syncs':>5} {'GFLOP/img':>9} {'conv GF/img':>11} {'MB/img':>7} {'XLA MB/img':>10} "
            f"{'FLOP ms':>7} {'HBM ms':>7}")
  print(header)
  print("-" * len(header))
  details = []
  for row in rows:
    model_name, batch, dtype, augment, views = row
    r = compile_row(row, devices, args.equiv_batch_size, args.bn_groups)
    p = profile(r["hlo"])
    if args.dump:
      out = pathlib.Path(args.dump)
      out.mkdir(parents=True, exist_ok=True)
      (out / ("_".join(map(str, row)) + ".hlo")).write_text(r["hlo"])
    convs = sum(n for k, n in p["kinds"].items() if k.startswith("cudnn conv"))
    print(f"{model_name:<9} {batch:>5} {dtype:<8} {augment:<7} {views:<10} {r['compile_s']:9.1f} "
          f"{p['kernels']:7d} {convs:5d} {len(p['syncs']):5d} {r['model_flops'] / batch / 1e9:9.2f} "
          f"{p['conv_flops'] / batch / 1e9:11.2f} {p['bytes'] / batch / 1e6:7.1f} "
          f"{r['xla_bytes'] / batch / 1e6:10.1f} {1e3 * r['model_flops'] / peak:7.2f} "
          f"{1e3 * p['bytes'] / bandwidth:7.2f}", flush=True)
    details.append((row, p))
  for row, p in details:
    print(f"\n## {':'.join(map(str, row))}: kernels by kind: "
          + ", ".join(f"{k} {n}" for k, n in p["kinds"].items()))
    print("   by part: " + ", ".join(f"{part} {n} kernels {b / row[1] / 1e6:.1f} MB/img"
                                     for part, (n, b) in sorted(p["parts"].items(), key=lambda kv: -kv[1][1])))
    for sync in p["syncs"]:
      print(f"   host sync: {sync}")
    for moved, inst, kind, op_name in p["heaviest"][:args.top]:
      print(f"   {moved / 1e6:9.1f} MB  {kind:<22} {inst:<28} {op_name}")


if __name__ == "__main__":
  main()
