"""Whole splits in memory as uint8 arrays, and evaluation batches (TF-free).

The sources that need no TensorFlow are read here: the embedded default
(Fashion-MNIST from Debian's IDX files in /usr/share/datasets/fashion-mnist,
`apt-get install -y dataset-fashion-mnist`) and a user's arrays
(npz:/path/file.npz). tfds names and image folders are decoded by
care_jax/input_pipeline.py, imported only when such a source is asked for,
so a run on the device augmentation backend over these sources, its
evaluation included, never imports TensorFlow (the GPU machines have none).

Evaluation batches: every example exactly once, normalised, no augmentation;
the last batch padded, with a `mask` marking the real rows.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import re
import zipfile
import zlib
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from care_jax import config_lib
from care_jax.augment_config import AugmentConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetUnavailableError(config_lib.ConfigError):
  """A dataset that cannot be read offline; the message says how to provide it."""


@dataclasses.dataclass
class ArrayDataset:
  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int32 [N]
  num_classes: int


# ------------------------------------------------------------------ sources without TensorFlow

def _read_idx(path: str) -> np.ndarray:
  """An IDX file of uint8 (gzipped or not); a truncated or foreign file is a one-line error."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip raises all three for damaged files
    raise _bad_idx(path, f"unreadable: {e}") from None
  if len(data) < 4 or data[:3] != b"\x00\x00\x08":  # magic: two zero bytes, 0x08 = uint8
    raise _bad_idx(path, "not a uint8 IDX file")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  if len(data) != 4 + 4 * ndim + int(np.prod(dims)):
    raise _bad_idx(path, f"{len(data) - 4 - 4 * ndim} bytes of data for shape {dims}")
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _bad_idx(path: str, why: str) -> DatasetUnavailableError:
  return DatasetUnavailableError(f"dataset: {path!r} is not a complete IDX file ({why}); copy it again, or "
                                 "reinstall Debian's files (apt-get install --reinstall dataset-fashion-mnist)")


def _idx_file(directory: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


_SPLIT = re.compile(r"^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def _parse_split(split: str):
  """'train', 'train[:2000]', 'test[10%:50%]' (tfds' slice syntax) -> (name, bounds or None)."""
  m = _SPLIT.match(split.replace(" ", ""))
  if m is None or (m.group(2) is None and "[" in split):
    raise DatasetUnavailableError(f"dataset: split {split!r} is not understood; use e.g. train, test, train[:2000] "
                                  "or train[:10%]")
  name, lo, lo_pct, hi, hi_pct = m.groups()
  if lo is None:
    return name, None
  return name, ((int(lo), bool(lo_pct)) if lo else None, (int(hi), bool(hi_pct)) if hi else None)


def _slice(n: int, bounds) -> slice:
  as_index = lambda b: None if b is None else (round(n * b[0] / 100) if b[1] else b[0])
  return slice(as_index(bounds[0]), as_index(bounds[1]))


def load_fashion_mnist_idx(split: str, directory: str = FASHION_MNIST_DIR):
  """Fashion-MNIST straight from IDX files: (images uint8 [N, 28, 28], labels); slices as in tfds."""
  name, bounds = _parse_split(split)
  prefix = {"train": "train", "test": "t10k"}.get(name)
  if prefix is None:
    raise DatasetUnavailableError(f"dataset: fashion_mnist split must be 'train' or 'test' (optionally sliced, "
                                  f"'train[:2000]'), got {split!r}")
  img = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
  lab = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
  if img is None or lab is None:
    raise FileNotFoundError(directory)
  images, labels = _read_idx(img), _read_idx(lab).astype(np.int32)
  if len(images) != len(labels):
    raise DatasetUnavailableError(f"dataset: {img!r} holds {len(images)} images but {lab!r} {len(labels)} labels; "
                                  "give both files of one split")
  if bounds is not None:
    rows = _slice(len(images), bounds)
    images, labels = images[rows], labels[rows]
  return images, labels


def _load_npz(path: str):
  if not os.path.exists(path):
    raise DatasetUnavailableError(f"dataset: npz file {path!r} does not exist; give npz:/absolute/path/file.npz")
  try:
    with open(path, "rb") as file:  # ours to close, whatever np.load makes of it
      f = np.load(file, allow_pickle=False)
      if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError("a single array (.npy), not an archive of arrays")
      names = sorted(f.files)
      arrays = {k: f[k] for k in ("images", "labels") if k in names}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # a damaged or foreign file
    raise DatasetUnavailableError(f"dataset: {path!r} is not a readable .npz archive ({e}); write it with "
                                  "np.savez(path, images=..., labels=...)") from None
  missing = {"images", "labels"} - set(arrays)
  if missing:
    raise DatasetUnavailableError(f"dataset: {path!r} lacks arrays {sorted(missing)}; it needs 'images' "
                                  f"[N, H, W(, C)] uint8 and 'labels' [N] (has {names})")
  images, labels = arrays["images"], arrays["labels"].astype(np.int32)
  if images.dtype != np.uint8:
    raise DatasetUnavailableError(f"dataset: {path!r} images must be uint8 in [0, 255], got {images.dtype}")
  return images, labels, int(labels.max()) + 1 if labels.size else 0


# ------------------------------------------------------------------ one size, three channels

@functools.partial(jax.jit, static_argnums=1)
def _resize(images, size: int):
  # tf.image.resize(bilinear, antialias=True)'s kernel: the same uint8 images
  # within one level (0.15% of Fashion-MNIST's 28->32 pixels differ by 1).
  shape = (images.shape[0], size, size, images.shape[3])
  resized = jax.image.resize(images.astype(jnp.float32), shape, "bilinear", antialias=True)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def resize_uint8(images, size: int) -> np.ndarray:
  """[N, H, W, C] -> uint8 [N, size, size, C], bilinear with antialiasing."""
  return np.asarray(_resize(np.asarray(images), size))


def to_rgb_size(images: np.ndarray, size: int) -> np.ndarray:
  """Grey -> 3 channels, resized once to size x size, uint8."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[1:3] != (size, size):
    # In pieces of 4096 images: bounded memory for big arrays.
    images = np.concatenate([resize_uint8(images[start:start + 4096], size)
                             for start in range(0, len(images), 4096)])
  return np.ascontiguousarray(images, np.uint8)


def load_dataset(name: str, split: str, image_size: int, data_dir: Optional[str] = None,
                 download: bool = False) -> ArrayDataset:
  """Reads a whole split into memory as uint8 [N, S, S, 3] + labels."""
  if name.startswith("npz:"):
    images, labels, classes = _load_npz(name[4:])
  elif name == "fashion_mnist":
    try:
      # IDX files under data_dir (e.g. copied to a machine without the Debian package) come first.
      idx_dir = data_dir if data_dir and _idx_file(data_dir, "t10k-labels-idx1-ubyte") else FASHION_MNIST_DIR
      images, labels = load_fashion_mnist_idx(split, idx_dir)
      classes = 10
    except FileNotFoundError:
      from care_jax import input_pipeline  # noqa: PLC0415 (TensorFlow: a prepared tfds copy)
      try:
        images, labels, classes = input_pipeline.load_tfds(name, split, data_dir, download, image_size)
      except DatasetUnavailableError:
        raise DatasetUnavailableError(
            f"dataset: fashion_mnist not found: install Debian's files (apt-get install -y dataset-fashion-mnist, "
            f"into {FASHION_MNIST_DIR}), pass --config.data_dir=DIR with a prepared tfds copy, "
            "or give --config.dataset=npz:/path/file.npz") from None
  else:
    from care_jax import input_pipeline  # noqa: PLC0415 (TensorFlow decodes tfds and image files)
    if name.startswith("folder:"):
      images, labels, classes = input_pipeline.load_folder(name[7:], image_size)
    else:
      images, labels, classes = input_pipeline.load_tfds(name, split, data_dir, download, image_size)
  if len(images) == 0:
    raise DatasetUnavailableError(f"dataset: {name!r} split {split!r} is empty")
  return ArrayDataset(to_rgb_size(images, image_size), labels, classes)


# ------------------------------------------------------------------ batches

def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  return max(1, num_examples // global_batch)


def normalized(images: np.ndarray, aug: AugmentConfig) -> np.ndarray:
  """uint8 images -> the normalised float32 input of an unaugmented view."""
  return ((images.astype(np.float32) / 255.0 - np.asarray(aug.mean, np.float32))
          / np.asarray(aug.std, np.float32))


def to_uint8(views: np.ndarray, aug: AugmentConfig) -> np.ndarray:
  """Undoes the normalisation of views (to augment them again, e.g. b after a)."""
  x = np.asarray(views) * np.asarray(aug.std, np.float32) + np.asarray(aug.mean, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def eval_batches(data: ArrayDataset, *, global_batch: int, aug: AugmentConfig,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Every example once, normalised, no augmentation; the last batch padded.

  Yields dicts images float32 [B_local, S, S, 3], labels, mask (1 = real row).
  """
  if global_batch % process_count:
    raise ValueError(f"eval batch {global_batch} is not divisible by the process count {process_count}")
  local = global_batch // process_count
  total = len(data.images)
  for start in range(0, total, global_batch):
    rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
    mask = rows < total
    rows = np.where(mask, rows, 0)
    yield {"images": normalized(data.images[rows], aug), "labels": data.labels[rows], "mask": mask}
