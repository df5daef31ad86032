"""Whole splits in memory as uint8 arrays, and evaluation batches (TF-free).

The sources that need no TensorFlow are read here: the embedded default
(Fashion-MNIST from Debian's IDX files in /usr/share/datasets/fashion-mnist,
`apt-get install -y dataset-fashion-mnist`) and a user's arrays
(npz:/path/file.npz: one set of examples, or one per split). Split specs use
tfds' syntax on every source ('train[:2000]', 'test[10%:50%]', 'train[:10%]+test')
and resolve to the rows tfds would read (parse_split, select_split); the rows a
local source's spec read are kept, so the evaluation can tell when its test
examples are also training ones. tfds names and image folders are decoded by
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
  # {split name ("" for a source of one set): row indices read}; None where not known
  # (a tfds split spec in a syntax beyond parse_split's, e.g. shards).
  rows: Optional[dict] = None


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


# tfds' split syntax (tensorflow.org/datasets/splits): parts joined by '+', each a split
# name with an optional [start:stop] in rows or in percent, negative from the end.
_SPLIT_PART = re.compile(r"^([\w-]+)(?:\[([^\]]*)\])?$")
_SLICE_BOUND = re.compile(r"^(-?\d+(?:\.\d+)?)(%?)$")
_SPLIT_EXAMPLES = "use e.g. train, test, train[:2000], test[10%:50%], train[-1000:] or train[:10%]+test"


@dataclasses.dataclass(frozen=True)
class SplitPart:
  """One '+'-separated part of a split spec: a split name and its slice bounds in
  rows or in percent (None: open)."""
  name: str
  start: Optional[float] = None
  stop: Optional[float] = None
  percent: bool = False

  def rows(self, num_examples: int, spec: str, source: str) -> np.ndarray:
    """The row indices this part reads from a split of num_examples, as tfds resolves
    them: percentages rounded to the closest row, a bound beyond the split refused."""
    for bound in (self.start, self.stop):
      if bound is None:
        continue
      if self.percent and abs(bound) > 100:
        raise DatasetUnavailableError(f"dataset: split {spec!r} reaches {bound:g}% of {source}'s {self.name!r}; "
                                      "percentages lie within -100% and 100%")
      if not self.percent and abs(bound) > num_examples:
        raise DatasetUnavailableError(
            f"dataset: split {spec!r} reaches row {bound:g} of {source}'s {self.name!r}, which holds {num_examples} "
            f"examples; use bounds within -{num_examples} and {num_examples}, or a percentage ({self.name}[:50%])")
    as_row = lambda b: None if b is None else (int(round(b * num_examples / 100)) if self.percent else int(b))
    return np.arange(num_examples)[as_row(self.start):as_row(self.stop)]


def parse_split(spec: str) -> list:
  """'train', 'train[:2000]', 'test[10%:50%]', 'train[:10%]+test' -> [SplitPart, ...]."""
  parts = []
  for text in re.split(r"\s*\+\s*", str(spec).strip()):
    match = _SPLIT_PART.match(text.replace(" ", ""))
    if match is None:
      raise DatasetUnavailableError(f"dataset: split {spec!r} is not understood; {_SPLIT_EXAMPLES}")
    name, selector = match.groups()
    if selector is None:
      parts.append(SplitPart(name))
      continue
    sides = selector.split(":")
    bounds = [_SLICE_BOUND.match(side) if side else None for side in sides]
    if len(sides) != 2 or not any(sides) or any(side and b is None for side, b in zip(sides, bounds)):
      raise DatasetUnavailableError(f"dataset: split {spec!r} is not understood; {_SPLIT_EXAMPLES}")
    units = {b.group(2) for b in bounds if b is not None}
    if len(units) > 1:  # tfds reads both in the first one's unit: [10%:2500] would be 10% to 2500%
      raise DatasetUnavailableError(f"dataset: split {spec!r} mixes a percentage and a row number in [{selector}]; "
                                    f"give both bounds in one unit, e.g. {name}[10%:25%] or {name}[1000:2500]")
    percent = units == {"%"}
    if not percent and any(b is not None and "." in b.group(1) for b in bounds):
      raise DatasetUnavailableError(f"dataset: split {spec!r} has a fractional row number in [{selector}]; rows are "
                                    f"whole numbers (fractions are for percentages, {name}[:12.5%])")
    start, stop = (None if b is None else float(b.group(1)) for b in bounds)
    parts.append(SplitPart(name, start, stop, percent))
  return parts


def select_split(spec: str, source: str, split_sizes: dict, read) -> tuple:
  """(images, labels, rows) of a split spec over a source's splits.

  split_sizes: {split name: examples} of the source, or {"": examples} for a source
  holding one set of examples that every split name reads (a plain npz, a folder of
  class folders); read(name, rows) -> (images, labels) of those rows. rows:
  {split name: row indices read}, to find examples two specs share."""
  parts = split_rows(spec, source, split_sizes)
  images, labels = zip(*(read(key, taken) for key, taken in parts))
  return np.concatenate(images), np.concatenate(labels), rows_by_split(parts)


def rows_by_split(parts) -> dict:
  """split_rows' parts as {split name: the row indices read from it, in order}."""
  rows = {}
  for key, taken in parts:
    rows[key] = np.concatenate([rows.get(key, np.zeros(0, np.int64)), taken])
  return rows


def split_rows(spec: str, source: str, split_sizes: dict) -> list:
  """[(split name, row indices)] of each part of a spec (select_split's split_sizes)."""
  parts = []
  for part in parse_split(spec):
    key = "" if set(split_sizes) == {""} else part.name
    if key not in split_sizes:
      raise unknown_split_error(source, part.name, spec, split_sizes)
    parts.append((key, part.rows(split_sizes[key], spec, source)))
  return parts


def unknown_split_error(source: str, name: str, spec: str, known) -> DatasetUnavailableError:
  """The one line for a spec naming a split the source lacks, with the closest one it has."""
  return DatasetUnavailableError(f"dataset: {source} has no split {name!r} (in {spec!r}); its splits are "
                                 f"{', '.join(sorted(known))}.{config_lib.did_you_mean(name, known)}")


def shared_examples(a: "ArrayDataset", b: "ArrayDataset") -> Optional[int]:
  """How many examples two loaded specs of one source both read (None: not known)."""
  if a.rows is None or b.rows is None:
    return None
  return sum(len(np.intersect1d(a.rows[k], b.rows[k])) for k in set(a.rows) & set(b.rows))


def load_fashion_mnist_idx(split: str, directory: str = FASHION_MNIST_DIR):
  """Fashion-MNIST straight from IDX files: (images uint8 [N, 28, 28], labels, rows);
  split specs as in tfds (parse_split)."""
  prefixes = {"train": "train", "test": "t10k"}
  files = {}
  for name, prefix in prefixes.items():
    img = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    lab = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    if img is not None and lab is not None:
      files[name] = (img, lab)
  if not files:
    raise FileNotFoundError(directory)
  wanted = {part.name for part in parse_split(split)}
  if wanted - set(prefixes):
    raise DatasetUnavailableError(f"dataset: fashion_mnist split must be 'train' or 'test' (optionally sliced, "
                                  f"'train[:2000]'), got {split!r}")
  if wanted - set(files):  # e.g. a data_dir with the test files only: a prepared tfds copy may have both
    raise FileNotFoundError(directory)
  arrays = {}
  for name in sorted(wanted):
    img, lab = files[name]
    images, labels = _read_idx(img), _read_idx(lab).astype(np.int32)
    if len(images) != len(labels):
      raise DatasetUnavailableError(f"dataset: {img!r} holds {len(images)} images but {lab!r} {len(labels)} "
                                    "labels; give both files of one split")
    arrays[name] = images, labels
  return select_split(split, "fashion_mnist", {k: len(v[1]) for k, v in arrays.items()},
                      lambda name, rows: (arrays[name][0][rows], arrays[name][1][rows]))


def _npz_splits(names) -> dict:
  """{split name: (images key, labels key)} of an archive's arrays: "" for one set
  ('images', 'labels'), else a split per '<split>_images' + '<split>_labels' pair or
  Keras' 'x_<split>' + 'y_<split>' pair (its mnist.npz: x_train, y_train, x_test, y_test)."""
  if {"images", "labels"} <= set(names):
    return {"": ("images", "labels")}
  splits = {}
  for key in names:
    for images, labels in (("{}_images", "{}_labels"), ("x_{}", "y_{}")):
      head, tail = images.split("{}")
      split = key[len(head):len(key) - len(tail)] if key.startswith(head) and key.endswith(tail) else ""
      if split and labels.format(split) in names:
        splits[split] = (key, labels.format(split))
  return splits


def _load_npz(path: str, split: str):
  if not os.path.exists(path):
    raise DatasetUnavailableError(f"dataset: npz file {path!r} does not exist; give npz:/absolute/path/file.npz")
  try:
    with open(path, "rb") as file:  # ours to close, whatever np.load makes of it
      f = np.load(file, allow_pickle=False)
      if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError("a single array (.npy), not an archive of arrays")
      names = sorted(f.files)
      splits = _npz_splits(names)
      arrays = {k: f[k] for pair in splits.values() for k in pair}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # a damaged or foreign file
    raise DatasetUnavailableError(f"dataset: {path!r} is not a readable .npz archive ({e}); write it with "
                                  "np.savez(path, images=..., labels=...)") from None
  if not splits:
    missing = sorted({"images", "labels"} - set(names))
    raise DatasetUnavailableError(f"dataset: {path!r} lacks arrays {missing}; it needs 'images' [N, H, W(, C)] "
                                  "uint8 and 'labels' [N], or such a pair per split (train_images, train_labels, "
                                  f"test_images, ...; or Keras' x_train, y_train, ...) (has {names})")
  for split_name, (images, labels) in splits.items():
    what = f"{path!r}" + (f" split {split_name!r}" if split_name else "")
    if arrays[images].dtype != np.uint8:
      raise DatasetUnavailableError(f"dataset: {what} images must be uint8 in [0, 255], got {arrays[images].dtype}")
    if len(arrays[images]) != len(arrays[labels]):
      raise DatasetUnavailableError(f"dataset: {what} holds {len(arrays[images])} images but {len(arrays[labels])} "
                                    "labels; give one label per image")
  # One class count for every split: a slice, or a test split, may lack the last class.
  classes = max((int(arrays[labels].max()) + 1 for _, labels in splits.values() if arrays[labels].size), default=0)
  images, labels, rows = select_split(
      split, f"npz:{path}", {k: len(arrays[v[1]]) for k, v in splits.items()},
      lambda name, taken: (arrays[splits[name][0]][taken], arrays[splits[name][1]][taken].astype(np.int32)))
  return images, labels, classes, rows


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
  rows = None
  if name.startswith("npz:"):
    images, labels, classes, rows = _load_npz(name[4:], split)
  elif name == "fashion_mnist":
    try:
      # IDX files under data_dir (e.g. copied to a machine without the Debian package) come first.
      idx_dir = data_dir if data_dir and _idx_file(data_dir, "t10k-labels-idx1-ubyte") else FASHION_MNIST_DIR
      images, labels, rows = load_fashion_mnist_idx(split, idx_dir)
      classes = 10
    except FileNotFoundError:
      from care_jax import input_pipeline  # noqa: PLC0415 (TensorFlow: a prepared tfds copy)
      try:
        images, labels, classes, rows = input_pipeline.load_tfds(name, split, data_dir, download, image_size)
      except DatasetUnavailableError:
        raise DatasetUnavailableError(
            f"dataset: fashion_mnist not found: install Debian's files (apt-get install -y dataset-fashion-mnist, "
            f"into {FASHION_MNIST_DIR}), pass --config.data_dir=DIR with a prepared tfds copy, "
            "or give --config.dataset=npz:/path/file.npz") from None
  else:
    from care_jax import input_pipeline  # noqa: PLC0415 (TensorFlow decodes tfds and image files)
    if name.startswith("folder:"):
      images, labels, classes, rows = input_pipeline.load_folder(name[7:], image_size, split)
    else:
      images, labels, classes, rows = input_pipeline.load_tfds(name, split, data_dir, download, image_size)
  if len(images) == 0:
    raise DatasetUnavailableError(f"dataset: {name!r} split {split!r} is empty")
  return ArrayDataset(to_rgb_size(images, image_size), labels, classes, rows)


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
