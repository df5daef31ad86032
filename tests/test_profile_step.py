"""experiments/profile_step.py: reading a trace's kernels back, and one traced CPU run.

A GPU trace cannot be made here, so its reading is checked on a hand-made
trace in the Chrome format jax's profiler writes (device processes, derived
lines, host events); the CPU run checks the accounting on a real trace.
"""

import pytest

from experiments import profile_step
from tests.test_train import _one_step_sgd_config


def test_busy_time_is_the_length_of_the_union_of_intervals():
  assert profile_step.busy_time([]) == 0.0
  assert profile_step.busy_time([(0.0, 2.0), (1.0, 2.0), (5.0, 1.0)]) == 4.0  # [0, 3) and [5, 6)
  assert profile_step.busy_time([(2.0, 3.0), (0.0, 10.0)]) == 10.0  # nested, out of order
  assert profile_step.busy_time([(0.0, 1.0), (1.0, 1.0)]) == 2.0  # touching


def _meta(kind, pid, name, tid=None):
  return {"ph": "M", "name": kind, "pid": pid, **({"tid": tid} if tid is not None else {}), "args": {"name": name}}


def test_kernels_are_the_device_streams_events_without_the_derived_lines():
  trace = {"traceEvents": [
      _meta("process_name", 1, "/device:GPU:0"), _meta("process_name", 2, "/host:CPU"),
      _meta("thread_name", 1, "Stream #13(Compute)", tid=13), _meta("thread_name", 1, "XLA Ops", tid=99),
      {"ph": "X", "pid": 1, "tid": 13, "ts": 10.0, "dur": 4.0, "name": "loop_add_fusion_1",
       "args": {"hlo_op": "loop_add_fusion.1", "hlo_module": "jit_step"}},
      {"ph": "X", "pid": 1, "tid": 13, "ts": 20.0, "dur": 2.0, "name": "sm90_xmma_fprop_kernel", "args": {}},
      # xprof's derived line repeats the kernel: counting it would double the time.
      {"ph": "X", "pid": 1, "tid": 99, "ts": 10.0, "dur": 4.0, "name": "loop_add_fusion.1", "args": {}},
      # The host's launch of the same op is not device time.
      {"ph": "X", "pid": 2, "tid": 5, "ts": 9.0, "dur": 1.0, "name": "ThunkExecutor::Execute",
       "args": {"hlo_op": "loop_add_fusion.1"}},
  ]}
  assert profile_step.kernel_events(trace) == [(10.0, 4.0, "loop_add_fusion.1"), (20.0, 2.0, "sm90_xmma_fprop_kernel")]


def test_a_traced_cpu_step_accounts_for_its_kernels_by_part(tmp_path):
  # test_train's [care] config: its 8-device step is in the compilation cache.
  r = profile_step.profile_config(_one_step_sgd_config(), steps=2, trace_dir=tmp_path)
  assert r["kernels"] > 100  # every op of the step, once a step
  assert abs(sum(ms for _, ms in r["parts"].values()) - r["kernel_ms"]) < 1e-6 * max(1.0, r["kernel_ms"])
  assert 0.0 < r["busy_ms"] <= r["kernel_ms"] + 1e-9  # a union is at most the sum
  assert r["busy_ms"] <= r["step_ms"] * 1.05  # the device was busy within the host's wall time
  # The model's passes are recognised from the step's HLO (named scopes).
  assert {"model forward", "model backward"} <= set(r["parts"])
  assert sum(n for _, _, n, _ in r["top"]) == r["kernels"]


def test_a_failing_row_is_named_the_next_still_runs_and_the_exit_status_is_1(monkeypatch, capsys):
  def profile_config(config, steps, trace_dir):
    if config.batch_size == 32:
      raise ValueError("INVALID_ARGUMENT: bad shape")
    if config.batch_size == 48:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9GiB.")
    return {"step_ms": 2.0, "busy_ms": 1.0, "kernels": 3, "kernel_ms": 1.5, "parts": {"loss": (3, 1.5)},
            "top": [("fusion", "loss", 3, 1.5)]}

  monkeypatch.setattr(profile_step, "profile_config", profile_config)
  try:
    profile_step.main(["--width", "0.125", "--rows", "resnet18:32:float32:views", "resnet18:48:float32:views",
                       "resnet18:64:float32:views"])
  except SystemExit as exit_info:
    code = exit_info.code
  else:
    code = 0
  # Out of memory is a finding, not a failure; the bug is, and says so in the exit status.
  assert code == ("profile_step: 1 failed (tracebacks above on stderr): "
                  "resnet18:32:float32:views:sequential: failed: ValueError: INVALID_ARGUMENT: bad shape")
  out, err = capsys.readouterr()
  rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("resnet18")}
  assert rows["resnet18:32:float32:views:sequential"][:2] == ["failed:", "ValueError:"]
  assert rows["resnet18:48:float32:views:sequential"] == ["out", "of", "device", "memory"]
  assert rows["resnet18:64:float32:views:sequential"] == ["2.00", "1.00", "50.0", "3"]
  assert err.count("Traceback (most recent call last)") == 1


def test_a_bad_row_or_width_stops_before_any_row_compiles(monkeypatch):
  calls = []
  monkeypatch.setattr(profile_step, "profile_config", lambda *args: calls.append(args))
  with pytest.raises(SystemExit) as exit_info:
    profile_step.main(["--width", "0", "--rows", "resnet18:32:float32:views"])
  assert exit_info.value.code.startswith("profile_step: row resnet18:32:float32:views:sequential: model_width=0.0: ")
  with pytest.raises(SystemExit) as exit_info:
    profile_step.main(["--rows", "resnet18:32:float32:views", "resnet18:30:float32:views"])
  assert "row resnet18:30:float32:views:sequential: batch_size=30 is not divisible" in exit_info.value.code
  assert calls == []  # not even the good first row
