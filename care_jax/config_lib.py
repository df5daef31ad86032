"""Config checking and run durations: everything about a config before any work.

`validate(config, num_devices)` raises ConfigError with one line that names the
field, the value and the fix; main.py prints that line and exits non-zero.
`resolve_durations` is the one place that turns epochs into steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import uuid
from typing import Iterable

import ml_collections
import numpy as np
from etils import epath

from care_jax import metric_writers
from care_jax.models import resnet

OPTIMIZERS = ("adam", "sgd", "lars")
SCHEDULES = ("constant", "cosine")
OBJECTIVES = ("care", "simclr", "equi_unif", "moco", "moco_care")
MOCO_OBJECTIVES = ("moco", "moco_care")
# Where the projections live and which bilinear form L_equi preserves.
GEOMETRIES = ("sphere", "hyperboloid", "symplectic")
EQUIVARIANCE_FORMS = {"sphere": None, "hyperboloid": "minkowski", "symplectic": "symplectic"}
DTYPES = ("float32", "bfloat16")
VIEW_BATCHINGS = ("sequential", "batched")  # what each means: at c.view_batching below
AUGMENT_BACKENDS = ("tf", "device")
LINEAR_PROBE_PROTOCOLS = ("features", "augmented", "lincls")
# Datasets the input pipeline reads (besides npz:/folder: sources and other tfds names).
KNOWN_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet2012", "imagenet100", "mnist",
                  "svhn_cropped")
# Read as a tfds stream for pretraining (too large for memory); imagenet100 = the
# release's 100-class subset of imagenet2012.
STREAMING_DATASETS = ("imagenet2012", "imagenet100")
_LOCAL_PREFIXES = ("npz:", "folder:")


def default_config() -> ml_collections.ConfigDict:
  """Every field the code reads, with its default; configs/*.py override some."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "fashion_mnist"
  c.data_dir = ""  # tfds data_dir; "" = tfds' default.
  c.download = False  # let tfds download (needs the network); off: fail fast with a hint.
  c.train_split = "train"  # pretraining split (may be unlabelled)
  c.eval_train_split = ""  # labelled split for kNN bank / linear probe; "" = train_split
  c.test_split = "test"
  c.image_size = 32
  # Side at which the pretraining images are held and cropped from (in-memory datasets);
  # 0 = image_size. The release's STL-10 runs crop 32x32 views from the 96x96 originals
  # (source_image_size=96, image_size=32); evaluation images are resized to image_size.
  c.source_image_size = 0
  # Crop resampling: False, bilinear through the box's corner pixels (crop_and_resize);
  # True, torchvision's resized_crop (PIL bilinear: half-pixel centres, antialiased when
  # the box is bigger than image_size), as the releases' pipelines resample.
  c.resize_antialias = False
  # Model.
  c.model = "resnet18"
  c.model_stem = "cifar"
  c.model_width = 1.0
  c.dtype = "float32"  # compute dtype; parameters stay float32.
  c.proj_hidden_dim = 512
  c.proj_dim = 128
  c.proj_head = "simclr"  # simclr: Linear -> BN -> ReLU -> Linear; mocov2: Linear -> ReLU -> Linear.
  # Objective.
  # care | simclr | equi_unif (the paper's L_equi + L_unif ablation) | moco | moco_care
  c.objective = "care"
  # sphere: unit vectors, dot products (rotations, SO(d)); hyperboloid: Lorentz model,
  # negative geodesic distance in InfoNCE, Minkowski form in L_equi (Lorentz group);
  # symplectic: unit vectors, dot-product InfoNCE, symplectic form in L_equi (even proj_dim).
  c.geometry = "sphere"
  c.temperature = 0.5
  c.equiv_weight = 0.03
  c.equiv_splits = 16
  c.equiv_crop = True  # False: the equivariance views skip the crop (release's ImageNet-100).
  # Images of each step given the e1/e2 views; 0 = the whole batch. The release's ImageNet-100
  # runs use 128 of 256 ("equivariant batch size"). Chunk k is the first
  # equiv_batch_size / equiv_splits images of block k of batch_size / equiv_splits
  # (equivariance_rows): chunks stay on their devices, every device gives its share.
  c.equiv_batch_size = 0
  # Augmentation pairs (a1, a2) the e-views draw per step, each shared by equiv_splits /
  # equiv_augment_pairs consecutive chunks; 0 = one pair per chunk (design.md). The
  # release's CIFAR/STL step draws one per step for all chunks (vmap randomness='same';
  # experiments/release_equiv_views.py), its ImageNet-100 runs one per GPU.
  c.equiv_augment_pairs = 0
  # tf: tf.data on the host CPU (care_jax/augment.py); device: the dataset held on the
  # accelerator as uint8, shuffled and augmented inside the jitted step (care_jax/augment_jax.py).
  c.augment_backend = "tf"
  # sequential: one forward pass per view (the release); batched: one pass over the views
  # interleaved along the batch, BatchNorm statistics per view: the same loss, gradients
  # and statistics, bigger kernels and a quarter of the launches for an accelerator.
  c.view_batching = "sequential"
  # Training-mode BatchNorm statistics per group of bn_groups consecutive images (each
  # view apart), as nn.DataParallel's per-GPU BatchNorm on bn_groups GPUs computes them
  # (the release's CIFAR/STL runs: 2 GPUs), the running statistics following group 0
  # (DataParallel keeps GPU 0's buffers); 1 = statistics over the global batch.
  # MoCo objectives group with moco_bn_groups instead.
  c.bn_groups = 1
  # MoCo-v2 (objective moco / moco_care): EMA key encoder and a queue of negatives.
  c.moco_momentum = 0.99  # key encoder = m * key + (1 - m) * query, every step.
  c.moco_queue_size = 65536  # a multiple of batch_size.
  c.moco_bn_groups = 8  # BatchNorm groups (MoCo's per-GPU BN); keys shuffled across them.
  # Optimisation.
  c.batch_size = 256
  c.num_epochs = 400.0
  c.num_train_steps = 0  # > 0 overrides num_epochs.
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.momentum = 0.9  # sgd and lars.
  c.weight_decay = 1e-6  # never applied to BatchNorm parameters or biases.
  c.schedule = "constant"  # constant | cosine, both after a linear warm-up.
  c.warmup_epochs = 0.0
  c.seed = 0
  # Logging, checkpoints, evaluation.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0  # kNN monitor interval; 0 = only at the end.
  c.eval_batch_size = 512
  c.knn_k = 200
  c.knn_temperature = 0.5  # weights exp(cos / T), pinned and saved with the result.
  c.knn_monitor_examples = 10000  # train-bank rows for the periodic monitor; 0 = all.
  c.final_eval = True
  c.linear_probe_epochs = 100  # the release's protocol: Adam 1e-3, wd 1e-6, batch 512.
  c.linear_probe_lr = 1e-3
  c.linear_probe_weight_decay = 1e-6
  c.linear_probe_batch_size = 512
  c.linear_probe_seeds = 1  # probes with seeds seed, seed+1, ...: mean and std
  # features: the classifier on frozen features of unaugmented training images (fast: one
  # extraction). augmented: the release's CIFAR/STL probe (its linear.py): SimCLR-augmented
  # training images every epoch through the frozen backbone with BatchNorm in training mode,
  # whose running statistics the test pass then uses (an encoder pass per image per epoch).
  # lincls: MoCo's main_lincls.py, the release's ImageNet-100 probe: RandomResizedCrop + flip
  # views every epoch through the frozen backbone with BatchNorm in inference mode, SGD
  # momentum 0.9 (linear_probe_lr, e.g. 30, and _weight_decay as L2), the rate x 0.1 at each
  # of linear_probe_lr_drop_epochs; reports the best epoch's test top-1, as the release.
  c.linear_probe_protocol = "features"
  c.linear_probe_lr_drop_epochs = (60, 80)  # lincls only
  c.wahba_trials = 20
  c.composition_trials = 10  # Corollary 1: pairs (a, b), ||R_{b o a} - R_b R_a||
  c.wahba_examples = 1000  # test images each sampled augmentation is applied to.
  c.random_init_baseline = False  # also report kNN / linear probe of the untrained encoder.
  # Multi-host: jax.distributed.initialize() when true (or JAX_COORDINATOR_ADDRESS is set).
  c.distributed = False
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  return c


def load_config_file(path, preset: str = "") -> ml_collections.ConfigDict:
  """get_config(preset) of a configs/*.py file, as --config=path:preset gives it (for scripts and tests)."""
  path = epath.Path(path)
  namespace = {"__file__": str(path), "__name__": path.stem}  # as config_flags' import sets them
  exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - a config file is code.
  return namespace["get_config"](preset) if preset else namespace["get_config"]()


class ConfigError(ValueError):
  """A bad config value; str(error) is the one line shown to the user."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
  close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
  return f' Did you mean "{close[0]}"?' if close else ""


def _choice(config, field: str, choices) -> None:
  value = config[field]
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not known; choose one of {', '.join(choices)}."
                      f"{did_you_mean(value, choices)}")


def _at_least(config, field: str, lower, what: str = "") -> None:
  value = config[field]
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= lower:
    raise ConfigError(f"{field}={value!r} must be a number >= {lower}{what}; "
                      f"set --config.{field}=<value >= {lower}>")


def _positive(config, field: str) -> None:
  value = config[field]
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
    raise ConfigError(f"{field}={value!r} must be a finite number > 0; set --config.{field}=<value > 0>")


def validate(config, num_devices: int = 1) -> None:
  """Raises ConfigError for the first bad field. Reads no data, starts no JAX work."""
  for field in ("batch_size", "equiv_splits", "eval_batch_size", "log_every_steps", "proj_hidden_dim", "knn_k",
                "image_size"):
    _at_least(config, field, 1)
  _at_least(config, "proj_dim", 2, " (embeddings on the unit sphere S^(d-1) need d >= 2)")
  for field in ("num_epochs", "num_train_steps", "warmup_epochs", "weight_decay", "equiv_weight", "equiv_batch_size",
                "equiv_augment_pairs", "eval_every_steps", "checkpoint_every_steps", "linear_probe_epochs", "wahba_trials",
                "momentum", "knn_monitor_examples", "linear_probe_weight_decay", "source_image_size"):
    _at_least(config, field, 0)
  _at_least(config, "wahba_examples", 2, " (Wahba, gamma_f and Corollary 1 compare pairs of test images)")
  if not config.momentum < 1:  # a trace with decay >= 1 never forgets: the step grows without bound
    raise ConfigError(f"momentum={config.momentum!r} must be in [0, 1); set --config.momentum=0.9")
  _at_least(config, "keep_checkpoints", 1)
  _at_least(config, "linear_probe_batch_size", 1)
  _at_least(config, "linear_probe_seeds", 1)
  _at_least(config, "composition_trials", 0)
  for field in ("temperature", "learning_rate", "knn_temperature", "linear_probe_lr"):
    _positive(config, field)
  _choice(config, "optimizer", OPTIMIZERS)
  _choice(config, "schedule", SCHEDULES)
  _choice(config, "objective", OBJECTIVES)
  _choice(config, "geometry", GEOMETRIES)
  _choice(config, "augment_backend", AUGMENT_BACKENDS)
  _choice(config, "view_batching", VIEW_BATCHINGS)
  _choice(config, "linear_probe_protocol", LINEAR_PROBE_PROTOCOLS)
  _validate_bn_groups(config)
  _choice(config, "proj_head", resnet.PROJECTION_HEADS)
  _choice(config, "dtype", DTYPES)
  _choice(config, "model", tuple(sorted(resnet.STAGE_SIZES)))
  _choice(config, "model_stem", resnet.STEMS)
  try:
    resnet.feature_dim(config.model, config.model_width)
  except ValueError as e:
    raise ConfigError(f"model_width={config.model_width!r}: {e}; set --config.model_width=0.25 or similar") from None
  dataset = str(config.dataset)
  if config.linear_probe_protocol == "augmented" and dataset in STREAMING_DATASETS:
    raise ConfigError(f"linear_probe_protocol='augmented' needs the probe's training split in memory; {dataset} "
                      "is streamed: set --config.linear_probe_protocol=lincls (or features)")
  drops = config.linear_probe_lr_drop_epochs
  if not isinstance(drops, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in drops):
    raise ConfigError(f"linear_probe_lr_drop_epochs={drops!r} must be a tuple of epochs >= 0; "
                      "set --config.linear_probe_lr_drop_epochs='(60, 80)'")
  if config.source_image_size and dataset in STREAMING_DATASETS:
    raise ConfigError(f"source_image_size={config.source_image_size} applies to in-memory datasets; {dataset} is "
                      "streamed and its views are cropped from the original images already: set "
                      "--config.source_image_size=0")
  if not (dataset.startswith(_LOCAL_PREFIXES) or dataset in KNOWN_DATASETS or "/" in dataset):
    raise ConfigError(f"dataset={dataset!r} is not known; use one of {', '.join(KNOWN_DATASETS)}, "
                      f"npz:/path/file.npz or folder:/path/to/root.{did_you_mean(dataset, KNOWN_DATASETS)}")

  if dataset in STREAMING_DATASETS and config.augment_backend == "device":
    raise ConfigError(f"augment_backend='device' holds the whole dataset on the devices; {dataset!r} is streamed: "
                      "set --config.augment_backend=tf")

  batch, splits = config.batch_size, config.equiv_splits
  if batch % num_devices:
    raise ConfigError(f"batch_size={batch} is not divisible by the {num_devices} devices; "
                      f"use a multiple of {num_devices}")
  if config.eval_batch_size % num_devices:
    raise ConfigError(f"eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices; "
                      f"use a multiple of {num_devices}")
  if config.linear_probe_protocol == "lincls" and config.linear_probe_batch_size % num_devices:
    raise ConfigError(f"linear_probe_batch_size={config.linear_probe_batch_size} is not divisible by the "
                      f"{num_devices} devices (lincls shards its batches); use a multiple of {num_devices}")
  if uses_equivariance(config):
    if batch % splits:
      raise ConfigError(f"batch_size={batch} is not divisible by equiv_splits={splits}; "
                        f"use an equiv_splits that divides {batch}")
    chunk = batch // splits
    if chunk < 2:
      raise ConfigError(f"equiv_splits={splits} gives chunks of {chunk} image (batch_size={batch}); "
                        f"a chunk needs >= 2 images: use equiv_splits <= {batch // 2}")
    per_device = batch // num_devices
    if per_device % chunk:
      raise ConfigError(f"equiv_splits={splits} gives chunks of {chunk} images that straddle devices "
                        f"({per_device} images per device on {num_devices}); use an equiv_splits that is "
                        f"a multiple of {num_devices}")
    equiv = config.equiv_batch_size
    if equiv > batch:
      raise ConfigError(f"equiv_batch_size={equiv} exceeds batch_size={batch}; use at most {batch} "
                        "(0 = the whole batch)")
    if equiv % splits:
      raise ConfigError(f"equiv_batch_size={equiv} is not divisible by equiv_splits={splits}; "
                        f"use a multiple of {splits} such as {max(1, equiv // splits) * splits}")
    pairs = config.equiv_augment_pairs
    if pairs and splits % pairs:
      raise ConfigError(f"equiv_augment_pairs={pairs} does not divide equiv_splits={splits}; use a divisor "
                        f"of {splits} (0 = one pair per chunk)")
    if equiv and equiv // splits < 2:
      raise ConfigError(f"equiv_batch_size={equiv} gives chunks of {equiv // splits} image "
                        f"(equiv_splits={splits}); a chunk needs >= 2 images: use equiv_batch_size >= {2 * splits}")
  if config.geometry == "symplectic" and config.proj_dim % 2:
    raise ConfigError(f"proj_dim={config.proj_dim} must be even for geometry='symplectic'; "
                      f"set --config.proj_dim={config.proj_dim + 1}")
  if config.geometry != "sphere" and config.objective not in ("care", "simclr"):
    raise ConfigError(f"geometry={config.geometry!r} works with objective care or simclr, not "
                      f"{config.objective!r}; set --config.geometry=sphere or --config.objective=care")
  if config.objective in MOCO_OBJECTIVES:
    _validate_moco(config)


def _validate_moco(config) -> None:
  m = config.moco_momentum
  if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0 <= m < 1:
    raise ConfigError(f"moco_momentum={m!r} must be in [0, 1); set --config.moco_momentum=0.99")
  _at_least(config, "moco_queue_size", 1)
  _at_least(config, "moco_bn_groups", 1)
  batch, queue, groups = config.batch_size, config.moco_queue_size, config.moco_bn_groups
  if queue % batch:
    raise ConfigError(f"moco_queue_size={queue} is not a multiple of batch_size={batch}; "
                      f"use --config.moco_queue_size={max(1, queue // batch) * batch}")
  if batch % groups:
    raise ConfigError(f"moco_bn_groups={groups} does not divide batch_size={batch}; use a divisor such as 8")
  if uses_equivariance(config) and (batch // groups) % (batch // config.equiv_splits):
    raise ConfigError(f"equiv_splits={config.equiv_splits} gives chunks of {batch // config.equiv_splits} images "
                      f"that straddle the {groups} BatchNorm groups of {batch // groups}; use an equiv_splits "
                      f"that is a multiple of moco_bn_groups={groups}")


def _validate_bn_groups(config) -> None:
  _at_least(config, "bn_groups", 1)
  groups = config.bn_groups
  if groups == 1:
    return
  if config.objective in MOCO_OBJECTIVES:
    raise ConfigError(f"bn_groups={groups} is for SimCLR-style objectives; objective={config.objective!r} groups "
                      "its BatchNorm with moco_bn_groups: set --config.bn_groups=1")
  for field in ("batch_size", "equiv_batch_size", "linear_probe_batch_size"):
    if config[field] % groups:
      raise ConfigError(f"bn_groups={groups} does not divide {field}={config[field]}; use a divisor of it "
                        "(nn.DataParallel splits each batch evenly over its GPUs)")


def uses_equivariance(config) -> bool:
  """Whether the e1/e2 views are computed (SimCLR, or weight 0, skips them)."""
  return config.objective not in ("simclr", "moco") and config.equiv_weight > 0


def release_cifar_stl_pipeline(c):
  """c with the reference release's CIFAR/STL pipeline as its code runs it (its
  main.py, linear.py, dataset.py and scripts), where that differs from design.md:

  - equiv_augment_pairs=1: the chunks' views come from one vmap(process,
    randomness='same') call, which draws ONE augmentation pair per step for all
    chunks (experiments/release_equiv_views.py shows it); 0 = one per chunk.
  - bn_groups=2: its scripts run nn.DataParallel on 2 GPUs, BatchNorm per GPU
    over half the batch, running statistics from GPU 0.
  - resize_antialias=True: crops resampled by torchvision's resized_crop (PIL).
  - linear_probe_protocol='augmented': its linear.py, augmented training images
    through the frozen encoder with BatchNorm in training mode.
  """
  c.equiv_augment_pairs = 1
  c.bn_groups = 2
  c.resize_antialias = True
  c.linear_probe_protocol = "augmented"
  return c


def source_size(config) -> int:
  """Side of the pretraining images the views are cropped from: source_image_size, 0 meaning image_size."""
  return int(config.source_image_size) or int(config.image_size)


def equiv_batch(config) -> int:
  """Images per step given the e1/e2 views: equiv_batch_size, 0 meaning the whole batch."""
  return int(config.equiv_batch_size) or int(config.batch_size)


def equiv_pairs(config) -> int:
  """Augmentation pairs the e-views draw per step: equiv_augment_pairs, 0 meaning one per chunk."""
  return int(config.equiv_augment_pairs) or int(config.equiv_splits)


def equivariance_rows(global_batch: int, num_chunks: int, equiv_batch: int) -> np.ndarray:
  """The global batch rows given the e1/e2 views, chunk after chunk: the first
  equiv_batch / num_chunks rows of each of the num_chunks blocks of
  global_batch / num_chunks rows (every row when equiv_batch == global_batch).
  validate() keeps blocks within devices, so a chunk's views are made and embedded
  where its images are, and each device (process) holds the same number of them."""
  blocks = np.arange(global_batch).reshape(num_chunks, global_batch // num_chunks)
  return blocks[:, :equiv_batch // num_chunks].reshape(-1)


def local_equivariance_rows(global_batch: int, num_chunks: int, equiv_batch: int | None, offset: int,
                            local: int) -> np.ndarray | None:
  """equivariance_rows of a process holding rows [offset, offset + local); None when every row
  is one (equiv_batch None or 0 meaning the whole batch)."""
  if not equiv_batch or equiv_batch == global_batch:
    return None
  rows = equivariance_rows(global_batch, num_chunks, equiv_batch)
  return rows[(rows >= offset) & (rows < offset + local)]


def saved_config(workdir, fix: str) -> dict | None:
  """The config.json a run wrote in workdir, None where it has none; one that does not
  parse (edited by hand) is a ConfigError naming it and ending in `fix`, the caller's."""
  try:
    return metric_writers.read_json(epath.Path(workdir) / "config.json")
  except metric_writers.DamagedFileError as e:
    raise ConfigError(f"{e}; {fix}") from None


def config_changes(saved: dict, config) -> list:
  """(field, saved value, this config's) for each field of a saved config (a run's config.json)
  that `config` changes; fields the saved one lacks (an older version's run) are not changes."""
  now = json.loads(config.to_json_best_effort())
  return [(k, saved[k], v) for k, v in now.items() if k in saved and saved[k] != v]


def check_workdir(workdir: str) -> epath.Path:
  """Creates workdir if needed and proves it writable (local paths and gs:// alike)."""
  if not workdir:
    raise ConfigError("workdir is empty; pass --workdir=<directory for checkpoints and logs>")
  # orbax wants absolute paths; remote ones (gs://...) already are.
  path = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
  probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - any filesystem error becomes one line.
    reason = getattr(e, "strerror", None) or type(e).__name__
    raise ConfigError(f"workdir={workdir!r} is not writable ({reason}); pass --workdir=<a writable directory>") \
        from None
  return path


@dataclasses.dataclass(frozen=True)
class Durations:
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int


def resolve_durations(config, num_train_examples: int) -> Durations:
  """num_train_steps > 0 wins over num_epochs; warm-up is given in epochs."""
  if num_train_examples < config.batch_size:
    # Every step's batch is cut from one epoch's permutation: a short split would
    # give short batches, which no longer split into equiv_splits chunks.
    raise ConfigError(f"train_split={config.train_split!r} of {config.dataset} holds {num_train_examples} "
                      f"examples, fewer than one batch (batch_size={config.batch_size}); use a larger "
                      f"--config.train_split or a --config.batch_size of at most {num_train_examples}")
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  if config.num_train_steps > 0:
    total = int(config.num_train_steps)
  else:
    total = int(round(config.num_epochs * steps_per_epoch))
  warmup = min(total, int(round(config.warmup_epochs * steps_per_epoch)))
  return Durations(steps_per_epoch, total, warmup)
