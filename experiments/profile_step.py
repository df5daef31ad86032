"""Measured profile of the CARE train step: a device trace of a few steps, read back by part.

    python -m experiments.profile_step                       # ResNet-18 B=512 bf16, device views, one pass
    python -m experiments.profile_step --rows resnet50:512:bfloat16:device --steps 3

gpu_aot_profile.py says what the compiled step launches; this says where a
step's time goes when it runs. Per row MODEL:B:DTYPE:AUGMENT[:VIEWS] (as in
bench_train_step.py) it compiles the step, runs two warm-up steps, traces
--steps more with jax.profiler and reads the trace's kernel events back
(the trace JSON jax writes beside the XPlane file; no TensorBoard needed):

  step ms     wall time per traced step, on the host (dispatch included)
  busy ms     per step, the time at least one kernel ran on the device (union
              of the kernel intervals over all streams)
  idle %      1 - busy / step: launch gaps, host syncs, anything the device
              waited on; a large share means the step is launch-bound
  kernels     kernel events per step in the trace
then per part of the step (the named scopes of care_jax/train.py, as in
gpu_aot_profile.py: augment, model forward / backward, loss, optimizer,
guard & metrics): kernels, ms per step and share of the summed kernel time,
and the --top kernels by time. The trace stays in --trace-dir for Perfetto
or TensorBoard.

Kernel events are the complete events on the trace's device processes
('/device:GPU:0', ...), leaving out the lines xprof derives from them (XLA
Ops, XLA Modules, Steps ...), which would count each kernel twice. A CPU has
no device process: there the events are XLA:CPU's thunks (host events that
name an HLO op), which is how the tests run this; XLA:CPU's library
convolutions keep no op_name, so on a CPU most of the model's time shows as
'other'.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import time

import jax

# Lines that xprof derives from the kernels (or from host annotations) on a
# device process; their events repeat the kernels' time.
DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Name Scope", "Framework Ops",
                 "TensorFlow Name Scope", "TensorFlow Ops", "Source code", "Host Offload Op")


def kernel_events(trace: dict) -> list:
  """[(start us, duration us, hlo op or kernel name)] of a Chrome-format trace's kernels (module docstring)."""
  events = trace.get("traceEvents", [])
  meta = lambda kind: {(e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]: e.get("args", {}).get("name", "")
                       for e in events if e.get("ph") == "M" and e.get("name") == kind}
  processes, threads = meta("process_name"), meta("thread_name")
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  out = []
  for e in events:
    if e.get("ph") != "X" or str(e.get("name", "")).startswith("end: "):
      continue
    args = e.get("args", {})
    if devices:
      if e["pid"] not in devices or threads.get((e["pid"], e.get("tid")), "") in DERIVED_LINES:
        continue
    elif "hlo_op" not in args:
      continue
    out.append((float(e["ts"]), float(e.get("dur", 0.0)), str(args.get("hlo_op") or e["name"])))
  return out


def busy_time(intervals) -> float:
  """Length of the union of [start, start + duration) intervals."""
  total, end = 0.0, float("-inf")
  for start, duration in sorted(intervals):
    stop = start + duration
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def op_parts(hlo_text: str) -> dict:
  """{entry instruction: its part of the step} of a compiled module.

  A fusion without metadata of its own (XLA:CPU's library fusions) is
  placed by the op_name of its fused computation's root, or of the last
  instruction before it that has one.
  """
  from experiments import gpu_aot_profile  # noqa: PLC0415

  roots, computation, last = {}, None, ""
  for line in hlo_text.splitlines():
    header = re.match(r"%?([\w.\-]+) \(.*\{$", line)
    if header:
      computation, last = header.group(1), ""
      continue
    op_name = re.search(r'op_name="([^"]*/[^"]*)"', line)  # a scoped name, not a region's bare "add"
    last = op_name.group(1) if op_name else last
    if computation and line.lstrip().startswith("ROOT ") and last:
      roots[computation] = last
  parts = {}
  for inst in gpu_aot_profile.parse_entry(hlo_text):
    op_name = inst.attribute("op_name") or roots.get((inst.attribute("calls") or "").lstrip("%"), "")
    parts[inst.name] = gpu_aot_profile.part_of_op_name(op_name)
  return parts


def summarize(events: list, hlo_text: str, steps: int, wall_s: float) -> dict:
  """Per-step figures and the breakdown by part and by kernel of `steps` traced steps."""
  part_of = op_parts(hlo_text)
  parts = collections.defaultdict(lambda: [0, 0.0])
  kernels = collections.defaultdict(lambda: [0, 0.0, ""])
  for _, duration, op in events:
    part = part_of.get(op, "unlabelled")
    parts[part][0] += 1
    parts[part][1] += duration
    kernel = kernels[op]
    kernel[0] += 1
    kernel[1] += duration
    kernel[2] = part
  per_step_ms = lambda us: us / 1e3 / steps
  return dict(
      step_ms=wall_s * 1e3 / steps, busy_ms=per_step_ms(busy_time((s, d) for s, d, _ in events)),
      kernels=len(events) / steps, kernel_ms=per_step_ms(sum(d for _, d, _ in events)),
      parts={p: (n / steps, per_step_ms(us)) for p, (n, us) in sorted(parts.items(), key=lambda kv: -kv[1][1])},
      top=[(op, part, n / steps, per_step_ms(us))
           for op, (n, us, part) in sorted(kernels.items(), key=lambda kv: -kv[1][1])])


def latest_trace(trace_dir: pathlib.Path) -> dict:
  """The Chrome-format trace jax's profiler wrote last under trace_dir."""
  files = sorted(trace_dir.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise SystemExit(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}/plugins/profile/")
  with gzip.open(files[-1], "rb") as f:
    return json.load(f)


def profile_config(config, steps: int, trace_dir: pathlib.Path) -> dict:
  """Compiles config's train step for all devices and traces `steps` steps on random inputs."""
  from experiments import bench_train_step  # noqa: PLC0415

  _, compiled, state, inputs = bench_train_step.compiled_step(config)
  for _ in range(2):  # warm-up: first-run allocations and autotuning stay out of the trace
    state, metrics = compiled(state, inputs)
  jax.block_until_ready(metrics)
  jax.profiler.start_trace(str(trace_dir))
  try:
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, inputs)
    jax.block_until_ready(metrics)
    wall_s = time.perf_counter() - t0
  finally:
    jax.profiler.stop_trace()
  return summarize(kernel_events(latest_trace(trace_dir)), compiled.as_text(), steps, wall_s)


def print_row(name: str, r: dict, top: int) -> None:
  idle = 100.0 * max(0.0, 1.0 - r["busy_ms"] / r["step_ms"]) if r["step_ms"] else 0.0
  print(f"{name:<40} {r['step_ms']:9.2f} {r['busy_ms']:9.2f} {idle:6.1f} {r['kernels']:8.0f}")
  total = r["kernel_ms"] or 1.0
  print("   by part:  " + ", ".join(f"{p} {n:.0f} kernels {ms:.2f} ms ({100 * ms / total:.0f}%)"
                                     for p, (n, ms) in r["parts"].items()))
  for op, part, n, ms in r["top"][:top]:
    print(f"   {ms:8.3f} ms  x{n:<4.0f} {part:<16} {op}")


def main(argv=None):
  from experiments import bench_train_step  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", nargs="*", default=["resnet18:512:bfloat16:device:batched"],
                      help="MODEL:B:DTYPE:AUGMENT[:VIEWS] rows, as in bench_train_step.py")
  parser.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier")
  parser.add_argument("--steps", type=int, default=5, help="traced steps per row")
  parser.add_argument("--top", type=int, default=10, help="kernels listed per row, most time first")
  parser.add_argument("--trace-dir", default="/tmp/care_jax_trace", help="where the traces stay")
  args = parser.parse_args(argv)
  if args.steps < 1:
    raise SystemExit(f"--steps={args.steps}: trace at least one step")
  rows = [bench_train_step._parse_row(r) for r in args.rows]
  bench_train_step.check_rows("profile_step", rows, args.width)  # before any row compiles
  device = jax.devices()[0]
  print(f"# CARE train step traced with jax.profiler: {args.steps} step(s) per row after 2 warm-up steps, "
        f"width {args.width:g}; jax {jax.__version__} on {jax.device_count()} x {device.device_kind}")
  print(f"{'row':<40} {'step ms':>9} {'busy ms':>9} {'idle %':>6} {'kernels':>8}")
  failed = []
  for row in rows:
    name = ":".join(str(x) for x in row)
    try:
      config = bench_train_step._config(row[0], args.width, *row[1:])
      r = profile_config(config, args.steps, pathlib.Path(args.trace_dir) / name.replace(":", "_"))
    except Exception as err:  # noqa: BLE001 (one row's failure, e.g. out of memory, leaves the others)
      note = bench_train_step.failure_note(err)
      print(f"{name:<40} {note}")
      if note != bench_train_step.OUT_OF_MEMORY:
        failed.append(f"{name}: {note}")
      continue
    print_row(name, r, args.top)
  if failed:
    raise SystemExit(f"profile_step: {len(failed)} failed (tracebacks above on stderr): " + "; ".join(failed))


if __name__ == "__main__":
  main()
