"""Datasets -> tf.data batches of augmented views (the only module importing TF).

Sources, by the config's `dataset` string:
  fashion_mnist           the embedded default: Debian's IDX files in
                          /usr/share/datasets/fashion-mnist (apt-get install
                          dataset-fashion-mnist), else a prepared tfds copy
  cifar10, cifar100, stl10, any tfds name with split syntax ('train[:10%]')
  npz:/path/file.npz      arrays 'images' [N, H, W(, C)] uint8 and 'labels' [N]
  folder:/path/to/root    one sub-folder per class of image files

Pretraining batches: for global step s, epoch = s // steps_per_epoch draws a
permutation from (seed, epoch); the global batch is a slice of it and each
process takes its contiguous rows. Any step can be the first one, so a resumed
run sees exactly the batches an uninterrupted run would have seen, and the
global batch is the same whatever the number of processes.
Evaluation batches: every example exactly once, the last batch padded, with a
`mask` marking the real rows.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from care_jax import augment, config_lib
from care_jax.augment_config import DATASET_STATS, augment_config, dataset_stats  # noqa: F401 (re-exported)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
class DatasetUnavailableError(config_lib.ConfigError):
  """A dataset that cannot be read offline; the message says how to provide it."""


@dataclasses.dataclass
class ArrayDataset:
  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int32 [N]
  num_classes: int


# ------------------------------------------------------------------ loading

def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(directory: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_fashion_mnist_idx(split: str, directory: str = FASHION_MNIST_DIR):
  """Fashion-MNIST straight from IDX files: (images uint8 [N, 28, 28], labels)."""
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise DatasetUnavailableError(f"dataset: fashion_mnist split must be 'train' or 'test' for the IDX files, got {split!r}")
  img = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
  lab = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
  if img is None or lab is None:
    raise FileNotFoundError(directory)
  return _read_idx(img), _read_idx(lab).astype(np.int32)


def _load_tfds(name: str, split: str, data_dir: Optional[str], download: bool):
  import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only for tfds sources)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name
    raise DatasetUnavailableError(
        f"dataset: unknown dataset {name!r} ({type(e).__name__}); use fashion_mnist, a tfds name "
        "(cifar10, cifar100, stl10, ...), npz:/path/file.npz or folder:/path") from None
  if download:
    builder.download_and_prepare()
  elif not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise DatasetUnavailableError(
        f"dataset: {name!r} is not prepared under {builder.data_dir} and this run does not download; "
        f"prepare it with tfds (tfds build {name} --data_dir=DIR, manual files under DIR/downloads/manual) "
        "and pass --config.data_dir=DIR, set --config.download=True where the network is reachable, "
        "or give --config.dataset=npz:/path/file.npz")
  # Batches of 4096, not batch_size=-1: that path (get_single_element) aborts
  # the process on TF 2.21 for datasets of unknown cardinality.
  parts = list(tfds.as_numpy(builder.as_dataset(split=split).batch(4096)))
  data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {"image": np.zeros((0, 1, 1, 3), np.uint8)}
  labels = data.get("label", np.full(len(data["image"]), -1))
  num_classes = builder.info.features["label"].num_classes if "label" in builder.info.features else 0
  return data["image"], np.asarray(labels, np.int32), num_classes


def _load_npz(path: str):
  if not os.path.exists(path):
    raise DatasetUnavailableError(f"dataset: npz file {path!r} does not exist; give npz:/absolute/path/file.npz")
  with np.load(path, allow_pickle=False) as f:
    missing = {"images", "labels"} - set(f.files)
    if missing:
      raise DatasetUnavailableError(f"dataset: {path!r} lacks arrays {sorted(missing)}; it needs 'images' "
                                    f"[N, H, W(, C)] uint8 and 'labels' [N] (has {sorted(f.files)})")
    images, labels = f["images"], f["labels"].astype(np.int32)
  if images.dtype != np.uint8:
    raise DatasetUnavailableError(f"dataset: {path!r} images must be uint8 in [0, 255], got {images.dtype}")
  return images, labels, int(labels.max()) + 1 if labels.size else 0


def _load_folder(root: str, image_size: int):
  if not os.path.isdir(root):
    raise DatasetUnavailableError(f"dataset: image folder {root!r} does not exist; give folder:/path with one sub-folder per class")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise DatasetUnavailableError(f"dataset: image folder {root!r} has no class sub-folders")
  images, labels = [], []
  for label, cls in enumerate(classes):
    for fname in sorted(os.listdir(os.path.join(root, cls))):
      raw = tf.io.read_file(os.path.join(root, cls, fname))
      img = tf.image.decode_image(raw, channels=3, expand_animations=False)
      images.append(_resize_uint8(img[None], image_size)[0])
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32), len(classes)


def _resize_uint8(images, size: int) -> np.ndarray:
  """[N, H, W, C] -> uint8 [N, size, size, C], bilinear with antialiasing."""
  resized = tf.image.resize(images, [size, size], method="bilinear", antialias=True)
  return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def _to_rgb_size(images: np.ndarray, size: int) -> np.ndarray:
  """Grey -> 3 channels, resized once to size x size, uint8."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[1:3] != (size, size):
    # In pieces of 4096 images: bounded memory for big arrays.
    images = np.concatenate([_resize_uint8(images[start:start + 4096], size)
                             for start in range(0, len(images), 4096)])
  return np.ascontiguousarray(images, np.uint8)


def load_dataset(name: str, split: str, image_size: int, data_dir: Optional[str] = None,
                 download: bool = False) -> ArrayDataset:
  """Reads a whole split into memory as uint8 [N, S, S, 3] + labels."""
  if name.startswith("npz:"):
    images, labels, classes = _load_npz(name[4:])
  elif name.startswith("folder:"):
    images, labels, classes = _load_folder(name[7:], image_size)
  elif name == "fashion_mnist":
    try:
      images, labels = load_fashion_mnist_idx(split)
      classes = 10
    except FileNotFoundError:
      try:
        images, labels, classes = _load_tfds(name, split, data_dir, download)
      except DatasetUnavailableError:
        raise DatasetUnavailableError(
            f"dataset: fashion_mnist not found: install Debian's files (apt-get install -y dataset-fashion-mnist, "
            f"into {FASHION_MNIST_DIR}), pass --config.data_dir=DIR with a prepared tfds copy, "
            "or give --config.dataset=npz:/path/file.npz") from None
  else:
    images, labels, classes = _load_tfds(name, split, data_dir, download)
  if len(images) == 0:
    raise DatasetUnavailableError(f"dataset: {name!r} split {split!r} is empty")
  return ArrayDataset(_to_rgb_size(images, image_size), labels, classes)


# ------------------------------------------------------------------ batches

def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  return max(1, num_examples // global_batch)


def pretraining_dataset(data: ArrayDataset, *, seed: int, global_batch: int, num_chunks: int,
                        aug: augment.AugmentConfig, start_step: int = 0, num_steps: Optional[int] = None,
                        process_index: int = 0, process_count: int = 1,
                        with_equivariance: bool = True, prefetch: int = 2) -> tf.data.Dataset:
  """Batches of views for global steps start_step, start_step + 1, ...

  Yields dicts x1, x2 (and e1, e2) float32 [B_local, S, S, 3], labels and step.
  """
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} is not divisible by the process count {process_count}")
  local = global_batch // process_count
  offset = process_index * local
  n = tf.cast(len(data.images), tf.int64)
  spe = steps_per_epoch(len(data.images), global_batch)
  images = tf.constant(data.images)
  labels = tf.constant(data.labels)

  def batch_for_step(step):
    epoch = step // spe
    order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
    start = (step % spe) * global_batch + offset
    idx = order[start:start + local]
    views = augment.pretraining_views(tf.gather(images, idx), seed, step, aug, global_batch=global_batch,
                                      num_chunks=num_chunks, offset=offset,
                                      with_equivariance=with_equivariance)
    views["labels"] = tf.gather(labels, idx)
    views["step"] = step
    return views

  end = None if num_steps is None else start_step + num_steps
  steps = tf.data.Dataset.range(start_step, end if end is not None else 2**62)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(1, os.cpu_count() or 1)
  return (steps.map(batch_for_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(prefetch).with_options(options))


def eval_batches(data: ArrayDataset, *, global_batch: int, aug: augment.AugmentConfig,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Every example once, normalised, no augmentation; the last batch padded.

  Yields dicts images float32 [B_local, S, S, 3], labels, mask (1 = real row).
  """
  if global_batch % process_count:
    raise ValueError(f"eval batch {global_batch} is not divisible by the process count {process_count}")
  local = global_batch // process_count
  total = len(data.images)
  stats = (np.asarray(aug.mean, np.float32), np.asarray(aug.std, np.float32))
  for start in range(0, total, global_batch):
    rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
    mask = rows < total
    rows = np.where(mask, rows, 0)
    images = (data.images[rows].astype(np.float32) / 255.0 - stats[0]) / stats[1]
    yield {"images": images, "labels": data.labels[rows], "mask": mask}


def normalized(images: np.ndarray, aug: augment.AugmentConfig) -> np.ndarray:
  """uint8 images -> the normalised float32 input of an unaugmented view."""
  return ((images.astype(np.float32) / 255.0 - np.asarray(aug.mean, np.float32))
          / np.asarray(aug.std, np.float32))


def sample_one_augmentation(seed: int, trial: int, height: int, width: int, aug: augment.AugmentConfig) -> dict:
  """The parameters of ONE augmentation drawn from (seed, trial), as Python values."""
  params = augment.sample_params(augment.view_seed(seed, trial, 0), 1, height, width, aug)
  return {k: np.asarray(v)[0].tolist() for k, v in params.items()}


def identity_augmentation(height: int, width: int) -> dict:
  """Parameters that change nothing (override fields to get one transform alone)."""
  return {"crop": [0.0, 0.0, float(height), float(width)], "flip": False, "jitter": False, "brightness": 1.0,
          "contrast": 1.0, "saturation": 1.0, "jitter_order": [0, 1, 2, 3], "hue": 0.0, "grayscale": False,
          "blur": False, "blur_sigma": 1.0}


_PARAM_DTYPES = {"crop": tf.float32, "flip": tf.bool, "jitter": tf.bool, "brightness": tf.float32,
                 "contrast": tf.float32, "saturation": tf.float32, "jitter_order": tf.int32, "hue": tf.float32,
                 "grayscale": tf.bool, "blur": tf.bool, "blur_sigma": tf.float32}


def apply_augmentation(images: np.ndarray, params: dict, aug: augment.AugmentConfig) -> np.ndarray:
  """One augmentation (Python-valued params) applied to every uint8 image -> normalised float32."""
  batched = {k: tf.repeat(tf.constant([v], _PARAM_DTYPES[k]), len(images), axis=0) for k, v in params.items()}
  return augment.apply(tf.constant(images), batched, aug).numpy()


def to_uint8(views: np.ndarray, aug: augment.AugmentConfig) -> np.ndarray:
  """Undoes the normalisation of views (to augment them again, e.g. b after a)."""
  x = views * np.asarray(aug.std, np.float32) + np.asarray(aug.mean, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
