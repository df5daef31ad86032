"""The program users run: main.py's one-line errors, resume, SIGTERM, corrupt
checkpoints, two processes under jax.distributed, the report."""

import json
import logging
import os
import pathlib
import re
import signal
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from care_jax import config_lib, input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"--config={ROOT / 'configs' / 'quickstart.py'}:smoke"
# Runs whose subject is not the input pipeline make their views on the device:
# the process then never imports TensorFlow (5-8 s of each run's start on 2
# cores) and shares its compiled step with the other device-backend runs.
DEVICE_VIEWS = "--config.augment_backend=device"

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(input_pipeline.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed")


def _env(devices: int = 8):
  env = dict(os.environ)
  # conftest's other XLA flags (-O0) too: the in-process evaluation below must
  # round as the subprocess did (-O0 vs -O3 moved a Wahba mean by 1.5e-4).
  others = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *others])
  env["PYTHONPATH"] = str(ROOT)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _main(*args, devices: int = 8, timeout: int = 300, **popen):
  return subprocess.run([sys.executable, "-m", "care_jax.main", *args], env=_env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, **popen)


def _smoke_config(**overrides):
  c = config_lib.load_config_file(ROOT / "configs" / "quickstart.py", "smoke")
  for k, v in overrides.items():
    c[k] = v
  return c


def _losses(workdir) -> dict:
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("override, expected", [
    ("--config.batchsize=64", 'no field \'batchsize\'. Did you mean "batch_size"?'),
    ("--config.equiv_splits=3", "batch_size=32 is not divisible by equiv_splits=3"),
    ("--config.batch_size=36", "batch_size=36 is not divisible by the 8 devices"),
    ("--config.equiv_splits=32", "chunks of 1 image"),
    ("--config.equiv_splits=2", "straddle devices"),
    ("--config.temperature=0.0", "temperature=0.0 must be a finite number > 0"),
    ("--config.learning_rate=-1.0", "learning_rate=-1.0 must be a finite number > 0"),
    ("--config.batch_size=-8", "batch_size=-8 must be a number >= 1"),
    ("--config.model=resnet19", 'model=\'resnet19\' is not known; choose one of resnet18, resnet34, resnet50. '
                                'Did you mean "resnet18"?'),
    ("--config.optimizer=adamw", "optimizer='adamw' is not known; choose one of adam, sgd, lars"),
    ("--config.dataset=cifar11", "dataset='cifar11' is not known"),
    ("--config.batch_size=abc", "--config.batch_size=abc"),
    ("--config.wahba_examples=1", "wahba_examples=1 must be a number >= 2 (Wahba, gamma_f and Corollary 1 compare"),
    ("--config.momentum=1.0", "momentum=1.0 must be in [0, 1); set --config.momentum=0.9"),
    # Read before training, not after it (the evaluation splits once failed at the end).
    pytest.param("--config.test_split=validation", "fashion_mnist split must be 'train' or 'test'",
                 marks=needs_fashion_mnist),
    # A split smaller than one batch gave short batches and an error deep in the loss.
    pytest.param("--config.train_split=train[:24]", "train_split='train[:24]' of fashion_mnist holds 24 examples, "
                 "fewer than one batch (batch_size=32); use a larger --config.train_split or a --config.batch_size "
                 "of at most 24", marks=needs_fashion_mnist),
])
def test_bad_config_is_one_line_and_nonzero(tmp_path, override, expected):
  started = time.perf_counter()
  result = _main(SMOKE, f"--workdir={tmp_path / 'run'}", override)
  assert result.returncode != 0
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert "Traceback" not in result.stderr, result.stderr
  assert expected in lines[-1], result.stderr
  assert time.perf_counter() - started < 60
  assert not (tmp_path / "run").exists()  # refused before any output: no empty workdir left behind


@needs_fashion_mnist
def test_bad_data_leaves_an_existing_workdir_and_its_files_as_they_were(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "notes.txt").write_text("mine")
  result = _main(SMOKE, f"--workdir={tmp_path / 'run'}", "--config.test_split=validation", DEVICE_VIEWS)
  assert result.returncode == 1 and "fashion_mnist split must be 'train' or 'test'" in result.stderr
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "notes.txt"]
  (tmp_path / "empty").mkdir()
  result = _main(SMOKE, f"--workdir={tmp_path / 'empty'}", "--config.test_split=validation", DEVICE_VIEWS)
  assert result.returncode == 1 and (tmp_path / "empty").is_dir()


@needs_fashion_mnist
def test_a_tf_data_run_prints_no_tensorflow_warnings_in_a_plain_shell(tmp_path):
  # The tests' own TF_CPP_MIN_LOG_LEVEL hid the 4 grappler PredictCost warnings that
  # every `make demo` printed: main.py set the variable after jax had loaded.
  # (and TF's persistent XLA cache, a test-only setting whose entries log errors of their own)
  env = {k: v for k, v in _env().items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS")}
  result = subprocess.run([sys.executable, "-m", "care_jax.main", SMOKE, f"--workdir={tmp_path / 'run'}",
                           "--config.num_train_steps=1", "--config.final_eval=False", "--config.eval_every_steps=0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()  # it trained, on tf.data (the smoke preset's backend)
  warnings = [l for l in result.stderr.splitlines() if re.match(r"[WE]\d{4} ", l)]
  assert not warnings, warnings[:2]


def test_unknown_preset_is_one_line_with_the_closest_preset(tmp_path):
  result = _main(f"--config={ROOT / 'configs' / 'quickstart.py'}:smok", f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: configs/quickstart.py: unknown preset 'smok'; use :smoke, :moco, :moco_care, :hyperboloid, "
      ":symplectic or none. Did you mean \"smoke\"?")


def test_missing_flags_stray_arguments_and_broken_config_files_are_one_line_each(tmp_path):
  # main.py's own refusals, before jax is imported: each one stderr line, status 2,
  # no workdir made. A config file that raises says its own error; one that is
  # missing or does not parse says which file.
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config():\n  raise ValueError('data_root is not set; pass --config.data_root')\n")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  work = f"--workdir={tmp_path / 'run'}"
  cases = [
      ((SMOKE, work, "runs/other"), "error: unexpected arguments ['runs/other']; use --config=..., --workdir=... "
                                    "and --config.<field>=<value>"),
      ((SMOKE,), "error: --config and --workdir are required, e.g. --config=configs/quickstart.py "
                 "--workdir=runs/quickstart"),
      ((work,), "error: --config and --workdir are required"),
      ((f"--config={raises}", work), "error: data_root is not set; pass --config.data_root"),
      # Python's own words for the syntax error vary by version; the file's name does not.
      ((f"--config={tmp_path / 'broken.py'}", work), "error: "),
      ((f"--config={tmp_path / 'absent.py'}", work), f"error: --config: could not load '{tmp_path / 'absent.py'}'"),
  ]
  for args, want in cases:
    result = _main(*args, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    assert lines[-1].startswith(want), (args, lines[-1])
    assert "broken.py" in lines[-1] or "broken.py" not in args[0], lines[-1]
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = _main(SMOKE, f"--workdir={blocker / 'run'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "is not writable" in result.stderr.strip().splitlines()[-1]


def test_the_evaluation_cli_refuses_bad_input_with_one_line_naming_its_own_flag(tmp_path):
  (tmp_path / "config.json").write_text(_smoke_config().to_json_best_effort())
  evaluate_cli = lambda *args: subprocess.run([sys.executable, "-m", "care_jax.evaluate", f"--workdir={tmp_path}",
                                               *args], env=_env(), cwd=ROOT, capture_output=True, text=True,
                                              timeout=120)
  bad = evaluate_cli("--linear_probe_epochs=-1")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: linear_probe_epochs=-1 must be a number >= 0; set --linear_probe_epochs=<value >= 0>")
  extra = evaluate_cli("runs/other")  # a second workdir typed without its flag was ignored
  assert extra.returncode == 2 and extra.stderr.strip().splitlines()[-1].startswith(
      "error: unexpected arguments ['runs/other']")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_validate_accepts_every_shipped_config():
  for path in sorted((ROOT / "configs").glob("*.py")):
    config = config_lib.load_config_file(path)
    assert set(config.keys()) == set(config_lib.default_config().keys()), path.name
    config_lib.validate(config, num_devices=1)
  for preset in ("smoke", "moco", "moco_care", "hyperboloid", "symplectic"):
    config_lib.validate(config_lib.load_config_file(ROOT / "configs" / "quickstart.py", preset), num_devices=8)


@pytest.mark.parametrize("value, expected", [
    (64, "equiv_batch_size=64 exceeds batch_size=32; use at most 32 (0 = the whole batch)"),
    (12, "equiv_batch_size=12 is not divisible by equiv_splits=8; use a multiple of 8 such as 8"),
    (8, "equiv_batch_size=8 gives chunks of 1 image (equiv_splits=8); a chunk needs >= 2 images: "
        "use equiv_batch_size >= 16"),
    (-8, "equiv_batch_size=-8 must be a number >= 0; set --config.equiv_batch_size=<value >= 0>"),
])
def test_a_bad_equivariance_sub_batch_names_the_field_and_the_fix(value, expected):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(_smoke_config(equiv_batch_size=value), num_devices=8)
  assert str(err.value) == expected
  config_lib.validate(_smoke_config(equiv_batch_size=16), num_devices=8)  # 2 of each chunk's 4 images
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(_smoke_config(equiv_augment_pairs=3), num_devices=8)
  assert str(err.value) == "equiv_augment_pairs=3 does not divide equiv_splits=8; use a divisor of 8 (0 = one pair per chunk)"
  config_lib.validate(_smoke_config(equiv_augment_pairs=2), num_devices=8)


def test_source_image_size_is_refused_for_streamed_datasets_with_the_fix():
  config = config_lib.load_config_file(ROOT / "configs" / "imagenet100_care.py")
  config.source_image_size = 256
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=1)
  assert str(err.value) == ("source_image_size=256 applies to in-memory datasets; imagenet100 is streamed and its "
                            "views are cropped from the original images already: set --config.source_image_size=0")


def test_bad_batchnorm_groups_name_the_field_and_the_fix():
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(_smoke_config(bn_groups=3), num_devices=8)
  assert str(err.value) == ("bn_groups=3 does not divide batch_size=32; use a divisor of it "
                            "(nn.DataParallel splits each batch evenly over its GPUs)")
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(_smoke_config(bn_groups=2, objective="moco"), num_devices=8)
  assert str(err.value) == ("bn_groups=2 is for SimCLR-style objectives; objective='moco' groups its BatchNorm "
                            "with moco_bn_groups: set --config.bn_groups=1")
  config_lib.validate(_smoke_config(bn_groups=2), num_devices=8)


def test_a_bad_linear_probe_protocol_names_the_field_and_the_fix():
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(_smoke_config(linear_probe_protocol="augment"), num_devices=8)
  assert str(err.value).startswith("linear_probe_protocol='augment' is not known; choose one of features, augmented")
  config = config_lib.load_config_file(ROOT / "configs" / "imagenet100_care.py")
  config.linear_probe_protocol = "augmented"
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=1)
  assert str(err.value) == ("linear_probe_protocol='augmented' needs the probe's training split in memory; "
                            "imagenet100 is streamed: set --config.linear_probe_protocol=lincls (or features)")
  config.linear_probe_protocol = "lincls"
  config.linear_probe_lr_drop_epochs = (60, -80)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=1)
  assert str(err.value) == ("linear_probe_lr_drop_epochs=(60, -80) must be a tuple of epochs >= 0; "
                            "set --config.linear_probe_lr_drop_epochs='(60, 80)'")
  config.linear_probe_lr_drop_epochs = (60, 80)
  config.linear_probe_batch_size = 500
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=8)
  assert str(err.value) == ("linear_probe_batch_size=500 is not divisible by the 8 devices (lincls shards its "
                            "batches); use a multiple of 8")


# ------------------------------------------------------------------ runs

class _TrainStepCompiles(logging.Handler):
  """Counts the train step's lowerings (jit's in-memory cache misses) while installed."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.count = 0

  def emit(self, record):
    self.count += bool(re.match(r"Compiling jit\((train_)?step\) ", record.getMessage()))

  def __enter__(self):
    self._log_compiles = jax.log_compiles(True)
    self._log_compiles.__enter__()
    logging.getLogger("jax._src.interpreters.pxla").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("jax._src.interpreters.pxla").removeHandler(self)
    self._log_compiles.__exit__(*exc)


@needs_fashion_mnist
@pytest.mark.parametrize("backend", ["tf", "device"])
def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path, backend):
  from care_jax import train
  # Both backends draw batches and views from the step alone, so a resume is exact.
  config = _smoke_config(num_train_steps=6, checkpoint_every_steps=2, final_eval=False, augment_backend=backend)
  compiles, summaries = [], []
  for workdir, stop in (("straight", None), ("resumed", 3), ("resumed", None)):
    with _TrainStepCompiles() as counter:
      summaries.append(train.train_and_evaluate(config, str(tmp_path / workdir), stop_at_step=stop))
    compiles.append(counter.count)
  assert summaries[1:] == [{"step": 3, "status": "stopped"}, {"step": 6, "status": "finished"}]
  assert (tmp_path / "resumed" / "checkpoints" / "3").is_dir()
  straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
  assert sorted(resumed) == list(range(1, 7))
  assert resumed == straight  # exact: same batches, same state, same programs
  # One compiled step per invocation, checkpoint saves and a restored state
  # included: a state whose dtypes, weak types or shardings drifted from the
  # step's outputs would compile a second program mid-run.
  assert compiles == [1, 1, 1]


@needs_fashion_mnist
def test_corrupt_latest_checkpoint_falls_back_and_temporary_dirs_are_cleaned(tmp_path, capfd):
  from care_jax import train
  config = _smoke_config(num_train_steps=4, checkpoint_every_steps=2, final_eval=False, augment_backend="device")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  ckpts = workdir / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
  for f in (ckpts / "4").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  leftover = ckpts / "6.orbax-checkpoint-tmp"  # what a SIGKILL mid-save leaves
  (leftover / "default").mkdir(parents=True)
  (leftover / "default" / "junk").write_bytes(b"partial")
  capfd.readouterr()
  train.train_and_evaluate(_smoke_config(num_train_steps=6, checkpoint_every_steps=2, final_eval=False,
                                         augment_backend="device"), str(workdir))
  err = capfd.readouterr().err
  assert "checkpoint at step 4 is unreadable" in err
  assert "(step 2) with a changed config: num_train_steps: 4 -> 6\n" in err  # the one field it changed
  assert (workdir / "checkpoints_unreadable" / "4").is_dir()
  assert not leftover.exists()
  assert sorted(_losses(workdir)) == list(range(1, 7))
  assert {p.name for p in ckpts.iterdir() if p.name.isdigit()} >= {"4", "6"}


@needs_fashion_mnist
def test_a_run_resumed_with_another_objective_or_width_stops_with_one_line_and_keeps_its_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  first = _main(SMOKE, f"--workdir={workdir}", DEVICE_VIEWS, "--config.num_train_steps=2", "--config.final_eval=False")
  assert first.returncode == 0, first.stderr[-2000:]
  second = _main(SMOKE, f"--workdir={workdir}", DEVICE_VIEWS, "--config.num_train_steps=4", "--config.final_eval=False",
                 "--config.objective=moco_care", "--config.moco_queue_size=64", "--config.moco_bn_groups=4")
  assert second.returncode == 1 and "Traceback" not in second.stderr
  assert "holds a different train state" in second.stderr.strip().splitlines()[-1]
  assert "moco/" in second.stderr.strip().splitlines()[-1]  # names an array the saved state lacks
  assert (workdir / "checkpoints" / "2").is_dir() and not (workdir / "checkpoints_unreadable").exists()
  # The same tree at another width: every array readable, none of the right shape.
  # It used to read as damage: each checkpoint moved aside, and the next run began afresh.
  third = _main(SMOKE, f"--workdir={workdir}", DEVICE_VIEWS, "--config.num_train_steps=4", "--config.final_eval=False",
                "--config.model_width=0.125")
  assert third.returncode == 1 and "Traceback" not in third.stderr
  assert "saved with shape (4,), this config's is (8,)" in third.stderr.strip().splitlines()[-1]
  assert (workdir / "checkpoints" / "2").is_dir() and not (workdir / "checkpoints_unreadable").exists()


@needs_fashion_mnist
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])  # preemption, and a first Ctrl-C
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path, stop):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "care_jax.main", SMOKE, f"--workdir={workdir}", DEVICE_VIEWS,
                           "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000"],
                          env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 180
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.5)
  if stop == signal.SIGTERM:  # while it trains, a second run in its workdir is refused at once
    second = _main(SMOKE, f"--workdir={workdir}", DEVICE_VIEWS)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"is in use by another training run (pid {proc.pid} on " in second.stderr.strip().splitlines()[-1]
  proc.send_signal(stop)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "rerun the same command to resume" in err
  assert ("Ctrl-C again to stop at once" in err) == (stop == signal.SIGINT)
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and saved[0] >= 3
  result = _main(SMOKE, f"--workdir={workdir}", DEVICE_VIEWS, f"--config.num_train_steps={saved[0] + 2}",
                 "--config.final_eval=False")
  assert result.returncode == 0, result.stderr
  assert f"(step {saved[0]})" in result.stderr
  assert max(_losses(workdir)) == saved[0] + 2


@needs_fashion_mnist
def test_training_that_diverges_stops_with_one_line_and_keeps_checkpoints(tmp_path):
  result = _main(SMOKE, f"--workdir={tmp_path / 'run'}", DEVICE_VIEWS, "--config.temperature=1e-30")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "NaN/inf" in result.stderr.strip().splitlines()[-1]


@needs_fashion_mnist
def test_pretraining_images_are_held_at_source_image_size_and_evaluation_reads_image_size(monkeypatch):
  # The release's STL-10 recipe (views cropped to 32 from the 96x96 originals), here as
  # Fashion-MNIST held at its native 28x28 with 16x16 views: the pretraining split
  # stays 28x28 (the views are crops of it: test_augment_jax's larger-source test),
  # and the evaluator must read its splits at 16 rather than reuse the training copy
  # (a conv net would take 28x28 images without a word).
  from jax.sharding import Mesh
  from care_jax import datasets, evaluate, train
  loads = []
  load = datasets.load_dataset

  def recording_load(name, split, image_size, *args, **kwargs):
    loads.append((split, image_size))
    return load(name, split, image_size, *args, **kwargs)

  monkeypatch.setattr(datasets, "load_dataset", recording_load)
  config = _smoke_config(source_image_size=28, train_split="train[:512]", eval_train_split="")
  data, count = train.load_pretraining_split(config)
  assert data.images.shape == (512, 28, 28, 3) and count == 512 and loads == [("train[:512]", 28)]
  evaluator = evaluate.RunEvaluator(config, train.build_model(config), Mesh(np.asarray(jax.devices()), ("data",)))
  evaluator.add_data(config.train_split, data)  # as train_and_evaluate offers it
  assert evaluator.data(config.train_split).images.shape == (512, 16, 16, 3)
  assert loads == [("train[:512]", 28), ("train[:512]", 16)]
  same_size = _smoke_config(train_split="train[:512]")
  evaluator = evaluate.RunEvaluator(same_size, train.build_model(same_size), Mesh(np.asarray(jax.devices()), ("data",)))
  data, _ = train.load_pretraining_split(same_size)
  evaluator.add_data(same_size.train_split, data)
  assert evaluator.data(same_size.train_split) is data and len(loads) == 3  # reused, not read again


@needs_fashion_mnist
def test_smoke_run_without_tensorflow_writes_report_metrics_tensorboard_and_plots(tmp_path, monkeypatch):
  # The GPU machines have no TensorFlow: with its import blocked, the whole job
  # (data, on-device views, training, kNN, probe, Wahba/composition/colour reports) runs.
  workdir = tmp_path / "run"
  blocked = ("import sys, runpy; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None; "
             "sys.argv[0] = 'care_jax.main'; runpy.run_module('care_jax.main', run_name='__main__')")
  command = [sys.executable, "-c", blocked, SMOKE, f"--workdir={workdir}", "--config.eval_every_steps=2", DEVICE_VIEWS]
  run = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  saved = json.loads((workdir / "report.json").read_text())
  # The same command again shows the finished run's report instead of evaluating it again.
  finished = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file() and p.name != ".lock"}
  again = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  lines = [l for l in again.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(  # and no evaluation before it
      f"already finished at step 4: {workdir / 'report.json'}  kNN top-1 {saved['knn_top1']:.2f}%"), again.stderr
  # Nothing rewritten or added (no header-only TensorBoard file either); .lock names the last process.
  assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file() and p.name != ".lock"} == finished
  for key in ("knn_top1", "linear_probe_top1", "wahba_error_mean", "wahba_error_max", "relative_equivariance"):
    assert np.isfinite(saved[key])
  assert saved["knn"]["k"] == 20 and saved["knn"]["temperature"] == 0.5 and saved["knn"]["bank_size"] == 2048
  assert saved["knn"]["num_queries"] == 1024  # the smoke preset's test[:1024]
  assert len(saved["wahba_trials"]) == 3 and saved["wahba_error_max"] >= saved["wahba_error_mean"] > 0
  assert 10.0 < saved["knn_top1"] <= 100.0  # 10 classes: above chance after 4 steps
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if "knn_top1" in r] == [2, 4]  # the monitor, then the final report
  for key in ("loss", "info_nce", "equivariance", "learning_rate", "images_per_sec", "embedding_std"):
    assert key in rows[-2]
  assert list(workdir.glob("events.out.tfevents.*"))
  assert (workdir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert (workdir / "wahba_errors.png").read_bytes()[:4] == b"\x89PNG"
  # Grey images: hue shifts and grayscale change nothing, so colour moves nothing.
  assert saved["colour_sensitivity"] < 1e-6 and saved["displacement"]["flip"] > 1e-4
  assert len(saved["composition_errors"]) == 2 and 0 < saved["composition_error_mean"] <= 1

  # The evaluation CLI path restores the checkpoint (read-only) and must agree
  # with the in-memory evaluation at the end of training.
  from care_jax import evaluate
  assert sorted(p.name for p in (workdir / "features" / "step_4").iterdir()) == ["test__1024_-0.npz", "train__2048_-0.npz"]
  # A relative --workdir, as a user types it (orbax itself only takes absolute paths).
  monkeypatch.chdir(workdir.parent)
  final_report = (workdir / "report.json").read_bytes()
  again = evaluate.evaluate_workdir(workdir.name, overrides={"linear_probe_seeds": 2})
  assert again["step"] == 4 and again["overrides"] == {"linear_probe_seeds": 2}
  # Its report goes beside the run's, never over the final report (which paper_runs reads as "finished").
  assert (workdir / "report.json").read_bytes() == final_report
  out = workdir / "evaluations" / "step_4_linear_probe_seeds=2"
  assert json.loads((out / "report.json").read_text())["linear_probe"]["seeds"] == [0, 1]
  assert (out / "wahba_errors.png").read_bytes()[:4] == b"\x89PNG"
  assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"  # from the run's metrics.jsonl
  for key in ("knn_top1", "wahba_error_mean", "relative_equivariance", "composition_error_mean"):
    assert again[key] == pytest.approx(saved[key], rel=1e-5)
  assert again["linear_probe"]["seeds"] == [0, 1] and len(again["linear_probe"]["top1_per_seed"]) == 2
  with pytest.raises(config_lib.ConfigError, match=r"--step=1: .* no checkpoint at or before it; its saved steps are 2, 4$"):
    evaluate.evaluate_workdir(workdir.name, step=1)
  # Damaged run files. report.json is made from the checkpoint: the same command evaluates it again.
  (workdir / "report.json").write_text('{"step": 4')
  rerun = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "report.json is not readable JSON (JSONDecodeError: " in rerun.stderr
  assert "evaluating step 4 again" in rerun.stderr
  assert json.loads((workdir / "report.json").read_text())["knn_top1"] == pytest.approx(saved["knn_top1"], rel=1e-5)
  # config.json is the run's record of its settings: refused with the fix, nothing rewritten or moved.
  (workdir / "config.json").write_text('{"batch_size": 3')
  refused = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert re.search(r"^error: .*run/config\.json is not readable JSON \(JSONDecodeError: .*\); restore it, or delete "
                   r"it to resume from the checkpoints under this config$", refused.stderr.strip().splitlines()[-1])
  assert (workdir / "config.json").read_text() == '{"batch_size": 3' and (workdir / "checkpoints" / "4").is_dir()
  with pytest.raises(config_lib.ConfigError, match=r"config\.json is not readable JSON .*; restore it, or delete it "
                     r"and rerun care_jax.main with the run's --config"):
    evaluate.evaluate_workdir(workdir.name)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _metrics(workdir) -> dict:
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "loss" in r}


def _two_processes(common, workdir):
  """care_jax.main as two processes under jax.distributed (2 CPU devices each): their stderr."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "care_jax.main", *common, f"--workdir={workdir}",
                             "--config.distributed=True",
                             f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
                             f"--config.process_id={i}"],
                            env=_env(devices=2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outs]


@needs_fashion_mnist
def test_two_processes_with_jax_distributed_match_one_process_and_resume(tmp_path):
  # SGD: the update is linear in the gradient (Adam's first step, g / |g|, turns
  # float noise in near-zero gradients into +-lr updates).
  common = [SMOKE, "--config.num_train_steps=3", "--config.final_eval=False", "--config.checkpoint_every_steps=2",
            "--config.optimizer=sgd", "--config.learning_rate=0.01"]
  _two_processes(common, tmp_path / "two")
  uninterrupted = _metrics(tmp_path / "two")
  # A pod preempted after step 3 but before its checkpoint was written: a new
  # pair resumes from the one written at step 2 (each process saved its part)
  # and must log exactly the step-3 numbers the first pair logged.
  shutil.rmtree(tmp_path / "two" / "checkpoints" / "3")
  errs = _two_processes(common, tmp_path / "two")
  assert "(step 2)" in errs[0], errs[0][-2000:]  # process 0 logs for both
  two = _metrics(tmp_path / "two")
  assert sorted(uninterrupted) == sorted(two) == [1, 2, 3]
  for key in ("loss", "grad_norm", "param_norm"):
    assert two[3][key] == uninterrupted[3][key], key
  one = _main(*common, f"--workdir={tmp_path / 'one'}", devices=4)
  assert one.returncode == 0, one.stderr[-3000:]
  single = _metrics(tmp_path / "one")
  assert sorted(single) == [1, 2, 3]
  # Same global batch, views, BatchNorm statistics and negatives: the first
  # loss to float precision (a sharding mistake moves it by > 1e-3). Gradients
  # only to 1e-3: cross-process all-reduces sum in another order, and a ReLU
  # input within ~1e-7 of 0 can flip its derivative; SGD amplifies that through
  # BatchNorm, how much depends on the flip (lr 0.05: ~1% in two steps; lr 0.01:
  # 3e-5 with LLVM -O3, 3e-3 with -O0), so the later losses only to 1e-2.
  assert two[1]["loss"] == pytest.approx(single[1]["loss"], rel=1e-6)
  assert two[1]["grad_norm"] == pytest.approx(single[1]["grad_norm"], rel=1e-3)
  for step in (2, 3):
    assert two[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-2)


@needs_fashion_mnist
def test_two_processes_on_the_device_backend_match_one_process(tmp_path):
  # The multi-host GPU path for data that fits on the devices: each process puts the
  # whole uint8 set on its devices and the step gathers and augments its batch there;
  # then the final report, each process embedding its part of the splits.
  common = [SMOKE, "--config.num_train_steps=2", "--config.optimizer=sgd", "--config.learning_rate=0.01",
            DEVICE_VIEWS]
  _two_processes(common, tmp_path / "two")
  one = _main(*common, f"--workdir={tmp_path / 'one'}", devices=4)
  assert one.returncode == 0, one.stderr[-3000:]
  two, single = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
  assert sorted(two) == sorted(single) == [1, 2]
  # As above: the first loss to float precision, gradients to 1e-3.
  assert two[1]["loss"] == pytest.approx(single[1]["loss"], rel=1e-6)
  assert two[1]["grad_norm"] == pytest.approx(single[1]["grad_norm"], rel=1e-3)
  assert two[2]["loss"] == pytest.approx(single[2]["loss"], rel=1e-2)
  reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("two", "one")]
  # Features equal to float precision: top-1 within 2 of the 1024 test images (a near tie may flip).
  for key in ("knn_top1", "linear_probe_top1"):
    assert reports[0][key] == pytest.approx(reports[1][key], abs=0.2), key
  for key in ("wahba_error_mean", "wahba_error_max", "relative_equivariance", "composition_error_mean"):
    assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-3), key
