"""config_lib.validate: every refusal is one line naming its field and a fix that works.

The table below reaches every `raise ConfigError` of the validation functions (the
test traces which lines run and reads the raises from the source), so a new check
without a row here fails."""
import ast
import inspect
import pathlib
import re
import sys

import pytest

from care_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = dict(preset="smoke")  # batch_size 32, equiv_splits 8, proj_dim 16
IMAGENET = dict(path="imagenet100_care.py")  # batch_size 256, streamed
MOCO = dict(preset="moco")  # batch_size 256, queue 4096, moco_bn_groups 8

# (base config, overrides, devices, the field named first, the message or its start)
REFUSALS = [
    (SMOKE, dict(batch_size=0), 8, "batch_size", "batch_size=0 must be a number >= 1; set --config.batch_size=<value >= 1>"),
    (SMOKE, dict(knn_k=True), 8, "knn_k", "knn_k=True must be a number >= 1"),
    (SMOKE, dict(warmup_epochs=-1.0), 8, "warmup_epochs", "warmup_epochs=-1.0 must be a number >= 0"),
    (SMOKE, dict(wahba_examples=1), 8, "wahba_examples", "wahba_examples=1 must be a number >= 2 (Wahba"),
    (SMOKE, dict(momentum=1.5), 8, "momentum", "momentum=1.5 must be in [0, 1); set --config.momentum=0.9"),
    (SMOKE, dict(keep_checkpoints=0), 8, "keep_checkpoints", "keep_checkpoints=0 must be a number >= 1"),
    (SMOKE, dict(linear_probe_batch_size=0), 8, "linear_probe_batch_size", "linear_probe_batch_size=0 must be"),
    (SMOKE, dict(linear_probe_seeds=0), 8, "linear_probe_seeds", "linear_probe_seeds=0 must be a number >= 1"),
    (SMOKE, dict(composition_trials=-1), 8, "composition_trials", "composition_trials=-1 must be a number >= 0"),
    (SMOKE, dict(temperature=float("inf")), 8, "temperature", "temperature=inf must be a finite number > 0"),
    (SMOKE, dict(knn_temperature=0.0), 8, "knn_temperature", "knn_temperature=0.0 must be a finite number > 0"),
    (SMOKE, dict(schedule="cosin"), 8, "schedule", 'schedule=\'cosin\' is not known; choose one of constant, cosine. '
                                                   'Did you mean "cosine"?'),
    (SMOKE, dict(objective="moco_car"), 8, "objective", "objective='moco_car' is not known"),
    (SMOKE, dict(geometry="hyperbolic"), 8, "geometry", "geometry='hyperbolic' is not known; choose one of sphere, "
                                                        'hyperboloid, symplectic. Did you mean "hyperboloid"?'),
    (SMOKE, dict(augment_backend="gpu"), 8, "augment_backend", "augment_backend='gpu' is not known; choose one of tf"),
    (SMOKE, dict(view_batching="vmap"), 8, "view_batching", "view_batching='vmap' is not known"),
    (SMOKE, dict(proj_head="byol"), 8, "proj_head", "proj_head='byol' is not known"),
    (SMOKE, dict(dtype="float16"), 8, "dtype", "dtype='float16' is not known; choose one of float32, bfloat16"),
    (SMOKE, dict(model_stem="cifar10"), 8, "model_stem", "model_stem='cifar10' is not known"),
    (SMOKE, dict(model_width=0.001), 8, "model_width", "model_width=0.001: model width must be a number > 0 giving at "
                                                       "least 1 channel"),
    (IMAGENET, dict(linear_probe_protocol="augmented"), 1, "linear_probe_protocol",
     "linear_probe_protocol='augmented' needs the probe's training split in memory"),
    (SMOKE, dict(linear_probe_lr_drop_epochs=(60.5,)), 8, "linear_probe_lr_drop_epochs",
     "linear_probe_lr_drop_epochs=(60.5,) must be a tuple of epochs >= 0"),
    (IMAGENET, dict(source_image_size=96), 1, "source_image_size", "source_image_size=96 applies to in-memory datasets"),
    (SMOKE, dict(dataset="cifar-10"), 8, "dataset", 'dataset=\'cifar-10\' is not known; use one of fashion_mnist'),
    (IMAGENET, dict(augment_backend="device"), 1, "augment_backend",
     "augment_backend='device' holds the whole dataset on the devices; 'imagenet100' is streamed: "
     "set --config.augment_backend=tf"),
    (SMOKE, dict(batch_size=36, equiv_splits=4), 8, "batch_size", "batch_size=36 is not divisible by the 8 devices"),
    (SMOKE, dict(eval_batch_size=100), 8, "eval_batch_size", "eval_batch_size=100 is not divisible by the 8 devices"),
    (SMOKE, dict(linear_probe_protocol="lincls", linear_probe_batch_size=20), 8, "linear_probe_batch_size",
     "linear_probe_batch_size=20 is not divisible by the 8 devices (lincls shards its batches)"),
    (SMOKE, dict(equiv_splits=3), 1, "batch_size", "batch_size=32 is not divisible by equiv_splits=3"),
    (SMOKE, dict(equiv_splits=32), 8, "equiv_splits", "equiv_splits=32 gives chunks of 1 image"),
    (SMOKE, dict(equiv_splits=4), 8, "equiv_splits", "equiv_splits=4 gives chunks of 8 images that straddle devices"),
    (SMOKE, dict(equiv_batch_size=64), 8, "equiv_batch_size", "equiv_batch_size=64 exceeds batch_size=32"),
    (SMOKE, dict(equiv_batch_size=12), 8, "equiv_batch_size", "equiv_batch_size=12 is not divisible by equiv_splits=8"),
    (SMOKE, dict(equiv_augment_pairs=3), 8, "equiv_augment_pairs", "equiv_augment_pairs=3 does not divide"),
    (SMOKE, dict(equiv_batch_size=8), 8, "equiv_batch_size", "equiv_batch_size=8 gives chunks of 1 image"),
    (SMOKE, dict(proj_dim=1), 8, "proj_dim", "proj_dim=1 must be a number >= 2 (embeddings on the unit sphere"),
    (SMOKE, dict(geometry="symplectic", proj_dim=15), 8, "proj_dim",
     "proj_dim=15 must be even for geometry='symplectic'; set --config.proj_dim=16"),
    (MOCO, dict(geometry="hyperboloid"), 8, "geometry", "geometry='hyperboloid' works with objective care or simclr"),
    (MOCO, dict(moco_momentum=1.0), 8, "moco_momentum", "moco_momentum=1.0 must be in [0, 1); "
                                                        "set --config.moco_momentum=0.99"),
    (MOCO, dict(moco_queue_size=0), 8, "moco_queue_size", "moco_queue_size=0 must be a number >= 1"),
    (MOCO, dict(moco_bn_groups=0), 8, "moco_bn_groups", "moco_bn_groups=0 must be a number >= 1"),
    (MOCO, dict(moco_queue_size=1000), 8, "moco_queue_size", "moco_queue_size=1000 is not a multiple of "
                                                             "batch_size=256; use --config.moco_queue_size=768"),
    (MOCO, dict(moco_bn_groups=3), 8, "moco_bn_groups", "moco_bn_groups=3 does not divide batch_size=256"),
    (dict(preset="moco_care"), dict(equiv_splits=8, moco_bn_groups=16), 8, "equiv_splits",
     "equiv_splits=8 gives chunks of 32 images that straddle the 16 BatchNorm groups of 16"),
    (SMOKE, dict(bn_groups=0), 8, "bn_groups", "bn_groups=0 must be a number >= 1"),
    (MOCO, dict(bn_groups=2), 8, "bn_groups", "bn_groups=2 is for SimCLR-style objectives"),
    (SMOKE, dict(bn_groups=8, equiv_batch_size=20), 8, "bn_groups", "bn_groups=8 does not divide "
                                                                   "equiv_batch_size=20"),
]

# Fixes that a message spells out in full ("set --config.momentum=0.9", not "<value >= 1>").
_CONCRETE_FIX = re.compile(r"(?:set|use) --config\.(\w+)=([^\s;,<'(]+)(?=$|[\s;(])")


def _config(base: dict, overrides: dict):
  config = config_lib.load_config_file(ROOT / "configs" / base.get("path", "quickstart.py"), base.get("preset", ""))
  for key, value in overrides.items():
    config[key] = value
  return config


def _refusal(config, devices: int) -> str:
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=devices)
  return str(err.value)


def _raise_lines() -> set:
  """Line numbers of every `raise ConfigError` in config_lib's validation functions."""
  functions = ("validate", "_validate_moco", "_validate_bn_groups", "_choice", "_at_least", "_positive")
  tree = ast.parse(inspect.getsource(config_lib))
  return {node.lineno for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name in functions
          for node in ast.walk(fn) if isinstance(node, ast.Raise)}


def test_every_refusal_is_one_line_naming_its_field_and_a_fix_and_the_table_reaches_every_raise():
  source = inspect.getsourcefile(config_lib)
  ran = set()

  def tracer(frame, event, arg):
    if frame.f_code.co_filename != source:
      return None
    if event == "line":
      ran.add(frame.f_lineno)
    return tracer

  messages = []
  previous = sys.gettrace()
  sys.settrace(tracer)
  try:
    for base, overrides, devices, field, expected in REFUSALS:
      messages.append(_refusal(_config(base, overrides), devices))
  finally:
    sys.settrace(previous)
  for (base, overrides, devices, field, expected), message in zip(REFUSALS, messages):
    assert message.startswith(expected), (overrides, message)
    assert message.startswith(f"{field}=") and "\n" not in message, message
    assert re.search(r"(set|use|choose|resume with|pass) ", message), f"no fix in: {message}"
  unreached = sorted(_raise_lines() - ran)
  assert not unreached, f"config_lib lines {unreached} raise with no row in REFUSALS"


def test_each_spelled_out_fix_makes_the_config_valid():
  fixed = []
  for base, overrides, devices, field, _ in REFUSALS:
    config = _config(base, overrides)
    fix = _CONCRETE_FIX.search(_refusal(config, devices))
    if fix is None:
      continue  # the message gives a rule ("use a multiple of 8"), not a value
    key, text = fix.groups()
    config[key] = type(config[key])(text)
    config_lib.validate(config, num_devices=devices)
    fixed.append(key)
  assert len(fixed) >= 10, fixed
