"""bench_train_step's bookkeeping on a GPU shared by two frameworks: references first, OOM rows kept;
and both benchmarks' refusal of bad arguments before any timing.

The timings themselves are the benchmark's business; here jax_row and torch_row are
replaced by stand-ins so the test checks what the table says when a row runs out of
device memory (the CIFAR ResNet-50 reference at B = 1024 does on an H200) or fails
otherwise.
"""

import types

import pytest

from experiments import bench_train_step as bench

XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.25GiB."
TORCH_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 139.81 GiB total capacity)"


def _fake_torch(calls):
  cuda = types.SimpleNamespace(is_available=lambda: True, empty_cache=lambda: calls.append("empty_cache"))
  return types.SimpleNamespace(__version__="0.0-fake", cuda=cuda)


def _patch(monkeypatch, calls, jax_ms, torch_ms):
  monkeypatch.setattr(bench.torch_reference, "torch_module", lambda: _fake_torch(calls))

  def torch_row(torch, config, steps, repeats):
    calls.append(("torch", config.model, config.batch_size))
    ms = torch_ms[config.model, config.batch_size]
    if isinstance(ms, Exception):
      raise ms
    return ms, "cuda"

  def jax_row(config, steps, repeats):
    calls.append(("jax", config.model, config.batch_size, config.dtype))
    ms = jax_ms[config.model, config.batch_size, config.dtype]
    if isinstance(ms, Exception):
      raise ms
    return {"ms": ms, "flops_per_image": 2e9, "flops_per_step": 2e9 * config.batch_size,
            "bytes_per_step": 5e7 * config.batch_size}

  monkeypatch.setattr(bench, "torch_row", torch_row)
  monkeypatch.setattr(bench, "jax_row", jax_row)


def test_references_run_first_and_out_of_memory_rows_print_mem(monkeypatch, capsys):
  calls = []
  _patch(monkeypatch, calls,
         jax_ms={("resnet18", 32, "bfloat16"): 4.0, ("resnet18", 64, "bfloat16"): RuntimeError(XLA_OOM),
                 ("resnet18", 64, "float32"): 10.0},
         torch_ms={("resnet18", 32): 12.0, ("resnet18", 64): RuntimeError(TORCH_OOM)})
  bench.main(["--steps", "1", "--repeats", "1", "--width", "0.125", "--rows", "resnet18:32:bfloat16:device",
              "resnet18:64:bfloat16:device", "resnet18:64:float32:views"])
  # Both references, each followed by handing the cache back, before any JAX row.
  assert calls[:4] == [("torch", "resnet18", 32), "empty_cache", ("torch", "resnet18", 64), "empty_cache"]
  assert [c[0] for c in calls[4:]] == ["jax"] * 3
  lines = capsys.readouterr().out.splitlines()
  assert "# reference resnet18 B=32: 12.0 ms/step, 2667 img/s (cuda)" in lines
  assert "# reference resnet18 B=64: out of device memory" in lines
  rows = {tuple(line.split()[:3]): line.split() for line in lines if line.startswith("resnet18")}
  assert rows["resnet18", "32", "bfloat16"][5:10] == ["4.0", "8000", "2.000", "-", "50.0"]  # CPU: no MFU
  assert rows["resnet18", "32", "bfloat16"][-3:] == ["12.0", "2667", "3.00x"]  # torch ms, img/s, speed-up
  assert rows["resnet18", "64", "bfloat16"][5] == "(mem)"  # the JAX row that ran out of memory
  assert rows["resnet18", "64", "float32"][5] == "10.0"  # the run went on after it
  assert rows["resnet18", "64", "float32"][-3:] == ["(mem)", "-", "-"]  # its reference had run out


def test_a_failing_row_or_reference_is_named_the_others_still_run_and_the_exit_status_is_1(monkeypatch, capsys):
  # One short GPU lease: a bug in one row must not cost the rows after it, nor pass for a full device.
  calls = []
  _patch(monkeypatch, calls,
         jax_ms={("resnet18", 32, "float32"): ValueError("INVALID_ARGUMENT: bad shape\nsecond line"),
                 ("resnet18", 64, "float32"): 10.0},
         torch_ms={("resnet18", 32): 12.0, ("resnet18", 64): RuntimeError("cuDNN error: bad param")})
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--steps", "1", "--repeats", "1", "--rows", "resnet18:32:float32:views", "resnet18:64:float32:views"])
  assert exit_info.value.code == ("bench_train_step: 2 failed (tracebacks above on stderr): "
                                  "reference resnet18 B=64: failed: RuntimeError: cuDNN error: bad param; "
                                  "resnet18:32:float32:views:sequential: failed: ValueError: INVALID_ARGUMENT: bad shape")
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert "# reference resnet18 B=64: failed: RuntimeError: cuDNN error: bad param" in lines
  rows = {tuple(line.split()[:2]): line for line in lines if line.startswith("resnet18")}
  assert rows["resnet18", "32"].split()[5:] == ["failed:", "ValueError:", "INVALID_ARGUMENT:", "bad", "shape"]
  assert rows["resnet18", "64"].split()[5] == "10.0"  # the row after the failed one ran
  assert rows["resnet18", "64"].split()[-3:] == ["(failed)", "-", "-"]  # no speed-up against a failed reference
  # Both tracebacks, for the bug report.
  assert err.count("Traceback (most recent call last)") == 2 and "second line" in err


def test_a_bad_row_stops_before_any_timing_with_one_line(monkeypatch):
  calls = []
  _patch(monkeypatch, calls, jax_ms={}, torch_ms={})
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--rows", "resnet18:32:float32:views", "resnet19:32:float32:views"])
  assert exit_info.value.code.startswith("bench_train_step: row resnet19:32:float32:views:sequential: "
                                         "model='resnet19' is not known")
  assert calls == []  # not even the first row's reference


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "100", "--chunk-sizes", "3"], "--chunk-sizes 3 does not divide --batch-sizes 100"),
    (["--batch-sizes", "1"], "--batch-sizes and --chunk-sizes must be >= 2"),
    (["--dim", "1"], "--dim must be >= 2 and --rounds >= 1 (got 1, 100)"),
    (["--quick", "--batch-sizes", "4096"], "no batch size left to time"),
])
def test_bench_losses_refuses_bad_sizes_before_any_timing(args, message, capsys):
  from experiments import bench_losses  # noqa: PLC0415
  with pytest.raises(SystemExit) as exit_info:
    bench_losses.main(args)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].endswith(message) or message in err[-1]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be a multiple of 16 (L_equi's chunk) from 16 to 8192, got 0"),
    (["--batch", "24"], "--batch must be a multiple of 16 (L_equi's chunk) from 16 to 8192, got 24"),
    (["--size", "4"], "--size must be >= 8 pixels (the blur kernel and crops need room), got 4"),
    (["--steps", "0"], "--steps and --rounds must be >= 1 (got 0, 3)"),
])
def test_bench_input_refuses_bad_sizes_before_any_timing(args, message, capsys):
  # These were a ZeroDivisionError or a TensorFlow traceback from inside the pipeline.
  from experiments import bench_input  # noqa: PLC0415
  with pytest.raises(SystemExit) as exit_info:
    bench_input.main(args)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


@pytest.mark.parametrize("kind, spec", [
    ("NVIDIA H200", (989e12, 4.8e12)), ("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)),
    ("NVIDIA H100 PCIe", (756e12, 2.0e12)), ("NVIDIA H100 NVL", (835e12, 3.9e12)),
    ("NVIDIA A100-SXM4-80GB", (312e12, 2.0e12)), ("TPU v5 lite", (197e12, 0.82e12)), ("TPU v4", (275e12, 1.2e12)), ("cpu", (None, None))])
def test_device_specs_match_the_device_kind_most_specific_first(kind, spec):
  assert bench._device_spec(types.SimpleNamespace(device_kind=kind)) == spec


def _in_bounds_taps(size: int, kernel: int, pad: int) -> int:
  """Brute force: (output position, filter tap) pairs of a stride-1 1-D window that land on the image."""
  out = size + 2 * pad - kernel + 1
  return sum(0 <= o - pad + k < size for o in range(out) for k in range(kernel))


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_model_flops_count_the_multiply_adds_as_written(padding):
  """2 x MACs of a matmul plus a 3x3 conv, against the closed form and a brute-force tap count."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  n, h, c_in, c_out, m, k = 2, 6, 3, 5, 7, 11

  def step(x, w, a, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.sum() + (a @ b).sum()

  args = (jnp.ones((n, h, h, c_in)), jnp.ones((3, 3, c_in, c_out)), jnp.ones((m, k)), jnp.ones((k, 4)))
  taps_1d = _in_bounds_taps(h, 3, 1 if padding == "SAME" else 0)
  expected_macs = n * taps_1d ** 2 * c_in * c_out + m * k * 4
  flops = bench.model_flops(jax.jit(step).lower(*args))
  # The reductions and the bias-free sums add a few elementwise FLOPs on top.
  elementwise = flops - 2 * expected_macs
  assert 0 <= elementwise <= n * h * h * c_out + m * 4 + 8, (flops, 2 * expected_macs)
