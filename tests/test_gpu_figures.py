"""experiments/gpu_figures.sh's plumbing, without compiling anything.

A device call returns at most 8 files from $OUT and runs at most 600 s, so the
script must keep to a few files, skip (and name the command for) a stage its
deadline leaves no time for, and say in one line what is missing for the e2e
stage. The stages themselves run at toy sizes with GPU_FIGURES_SMOKE=1 (README).
"""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(tmp_path, *stages, **env):
  out = tmp_path / "out"
  full_env = {**os.environ, "OUT": str(out), **env}
  proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_figures.sh"), *stages], env=full_env,
                        capture_output=True, text=True, timeout=120)
  return proc, out


def test_stages_without_time_left_are_skipped_with_the_command_that_runs_them(tmp_path):
  proc, out = _run(tmp_path, "losses", "resnet18", "e2e", "profile", "resnet50", GPU_FIGURES_DEADLINE="30")
  assert proc.returncode == 0, proc.stderr
  tables = (out / "tables.txt").read_text()
  for stage in ("losses", "resnet18", "e2e", "profile", "resnet50"):
    assert f"=== {stage}: skipped" in tables and f"run it as: bash experiments/gpu_figures.sh {stage}" in tables
  assert sorted(p.name for p in out.iterdir()) == ["errors.txt", "tables.txt"]


def test_e2e_without_the_carried_data_says_what_to_carry_and_the_call_goes_on(tmp_path):
  empty = tmp_path / "no_data"
  empty.mkdir()
  proc, out = _run(tmp_path, "e2e", "bogus", GPU_FIGURES_DATA=str(empty))
  tables = (out / "tables.txt").read_text()
  assert "=== e2e: rc=2" in tables
  assert f"no Fashion-MNIST IDX files in {empty}/; run 'make gpu-carry' here and carry .gpu_data" in proc.stdout
  # An unknown stage stops the script with one line naming the known ones.
  assert proc.returncode == 2 and "unknown stage 'bogus'; use env, losses, resnet18, e2e, profile, resnet50" in proc.stdout
  assert len(list(out.iterdir())) <= 8
