"""Datasets -> tf.data batches of augmented views (the only module importing TF).

Sources, by the config's `dataset` string:
  fashion_mnist           the embedded default: Debian's IDX files in
                          /usr/share/datasets/fashion-mnist (apt-get install
                          dataset-fashion-mnist), else a prepared tfds copy
  cifar10, cifar100, stl10, any tfds name with split syntax ('train[:10%]')
  npz:/path/file.npz      arrays 'images' [N, H, W(, C)] uint8 and 'labels' [N] (one
                          set, sliced by the split spec), or such a pair per split
                          (train_images + train_labels, ...; Keras' x_train + y_train)
  folder:/path/to/root    one sub-folder per class of image files (one set), or
                          one per split of those (root/train/<class>/, root/val/...)
The in-memory reads of fashion_mnist and npz need no TensorFlow and live in
care_jax/datasets.py; tfds names and folders are decoded here (load_tfds,
load_folder), and imagenet2012 / imagenet100 are streamed for pretraining.

Pretraining batches: for global step s, epoch = s // steps_per_epoch draws a
permutation from (seed, epoch); the global batch is a slice of it and each
process takes its contiguous rows. Any step can be the first one, so a resumed
run sees exactly the batches an uninterrupted run would have seen, and the
global batch is the same whatever the number of processes.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from care_jax import augment, config_lib
from care_jax.augment_config import DATASET_STATS, augment_config, dataset_stats  # noqa: F401 (re-exported)
# The TF-free in-memory sources and evaluation batches, re-exported: one import for a tf.data user.
from care_jax.datasets import (FASHION_MNIST_DIR, ArrayDataset, DatasetUnavailableError,  # noqa: F401
                               eval_batches, load_dataset, load_fashion_mnist_idx, normalized, resize_uint8,
                               rows_by_split, select_split, split_rows, steps_per_epoch,
                               to_uint8, unknown_split_error)

# The release's ImageNet-100: CMC's 100 ImageNet-1k classes (github.com/HobbitLong/CMC, issue 21).
IMAGENET100_CLASSES = tuple("""
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split())
STREAMING_DATASETS = config_lib.STREAMING_DATASETS  # read as a stream for pretraining


def _tfds_builder(name: str, data_dir: Optional[str], download: bool):
  """The prepared tfds builder, or a one-line DatasetUnavailableError within seconds."""
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
  return builder


def _check_split(builder, name: str, split: str) -> None:
  """A split spec ('train', 'train[:10%]+test') naming a split the prepared dataset
  lacks is a one-line error (tfds' own is a traceback, and may come after training)."""
  known = list(builder.info.splits.keys())
  if not known:  # no split metadata (tfds' mock data): tfds decides when reading
    return
  for part in split.split("+"):
    base = part.split("[")[0].strip()
    if base not in known:
      raise unknown_split_error(repr(name), base, split, known)


def check_split(name: str, split: str, data_dir: Optional[str], download: bool = False) -> None:
  """_check_split from the dataset's metadata alone (no example is read)."""
  _check_split(_tfds_builder(_tfds_name(name), data_dir, download), name, split)


def _class_subset(name: str, builder, ds):
  """(examples, number of classes): a class subset's examples only, relabelled 0..K-1 in list order.

  Datasets without a subset come back unchanged, with (None) for the builder's class count.
  """
  if name != "imagenet100":
    return ds, None
  label = builder.info.features["label"]
  old = tf.constant([label.str2int(w) for w in IMAGENET100_CLASSES], tf.int64)
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      old, tf.range(len(IMAGENET100_CLASSES), dtype=tf.int64)), default_value=-1)
  ds = ds.map(lambda ex: dict(ex, label=table.lookup(tf.cast(ex["label"], tf.int64))))
  return ds.filter(lambda ex: ex["label"] >= 0), len(IMAGENET100_CLASSES)


def _tfds_name(name: str) -> str:
  return "imagenet2012" if name == "imagenet100" else name


# The map functions hold no Python control flow on tensors (their loops and
# branches run over Python values), so AutoGraph's source rewrite is skipped:
# it took ~3 s of a run's start-up converting the augmentation code.
_graph_only = tf.autograph.experimental.do_not_convert


def _center_crop_uint8(image, size: int):
  """Evaluation view of a variable-size image: shorter side to size * 256/224, centre size x size."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size * 256.0 / 224.0 / tf.reduce_min(shape)
  resized = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32), method="bilinear", antialias=True)
  crop = tf.image.resize_with_crop_or_pad(resized, size, size)
  return tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)


def load_tfds(name: str, split: str, data_dir: Optional[str], download: bool, image_size: int = 0):
  import tensorflow_datasets as tfds  # noqa: PLC0415
  builder = _tfds_builder(_tfds_name(name), data_dir, download)
  _check_split(builder, name, split)
  # Decoded after the class filter (ImageNet-100 keeps 1 image in 10), by the
  # same op as the streamed paths, so in-memory and streamed pixels agree.
  ds, subset_classes = _class_subset(name, builder, builder.as_dataset(split=split,
                                                                       decoders=_skip_image_decoding()))
  channels = builder.info.features["image"].shape[-1]
  variable_size = None in builder.info.features["image"].shape[:2]

  def decode(ex):
    image = tf.io.decode_image(ex["image"], channels=channels, expand_animations=False)
    image.set_shape(builder.info.features["image"].shape)
    # Variable-size images (ImageNet) get their fixed-size evaluation view.
    return dict(ex, image=_center_crop_uint8(image, image_size) if variable_size else image)

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  # Batches of 4096, not batch_size=-1: that path (get_single_element) aborts
  # the process on TF 2.21 for datasets of unknown cardinality.
  parts = list(tfds.as_numpy(ds.batch(4096)))
  data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {"image": np.zeros((0, 1, 1, 3), np.uint8)}
  labels = data.get("label", np.full(len(data["image"]), -1))
  num_classes = subset_classes or (builder.info.features["label"].num_classes if "label" in builder.info.features
                                   else 0)
  return data["image"], np.asarray(labels, np.int32), num_classes, _tfds_rows(builder, name, split)


def _tfds_rows(builder, name: str, split: str) -> Optional[dict]:
  """{split: row indices} a spec reads, from the split sizes alone (datasets.split_rows
  resolves specs as tfds does); None without split metadata, for a spec beyond its
  syntax (shards), or for imagenet100, whose rows are those of its class filter."""
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  if not sizes or name == "imagenet100":
    return None
  try:
    return rows_by_split(split_rows(split, name, sizes))
  except DatasetUnavailableError:
    return None


FOLDER_IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what tf.image.decode_image reads


def _image_files(folder: str) -> list:
  # Image files only, as torchvision's ImageFolder: a README or .DS_Store beside them is no sample.
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(FOLDER_IMAGE_TYPES)
                and os.path.isfile(os.path.join(folder, f)))


def _subfolders(folder: str) -> list:
  return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def load_folder(root: str, image_size: int, split: str = "train"):
  """(images, labels, classes, rows) of a folder source and split spec.

  Two layouts: root/<class>/<image> is one set of examples that every split name
  reads (slices apply: train[:90%], test[90%:]); root/<split>/<class>/<image>
  (ImageNet's train/ and val/) gives each split its folder. Classes are numbered in
  sorted order over every split's class folders, so all splits share one labelling.
  Only the rows the spec selects are decoded."""
  if not os.path.isdir(root):
    raise DatasetUnavailableError(f"dataset: image folder {root!r} does not exist; give folder:/path with one sub-folder per class")
  top = _subfolders(root)
  if not top:
    raise DatasetUnavailableError(f"dataset: image folder {root!r} has no class sub-folders")
  # Split folders hold class folders and no images of their own; class folders hold images.
  by_split = not any(_image_files(os.path.join(root, d)) for d in top) and all(
      _subfolders(os.path.join(root, d)) for d in top)
  folders = {d: os.path.join(root, d) for d in top} if by_split else {"": root}
  classes = sorted({c for folder in folders.values() for c in _subfolders(folder)})
  files = {name: [(os.path.join(folder, c, f), label) for label, c in enumerate(classes)
                  if os.path.isdir(os.path.join(folder, c)) for f in _image_files(os.path.join(folder, c))]
           for name, folder in folders.items()}
  if not any(files.values()):
    raise DatasetUnavailableError(f"dataset: image folder {root!r} has no {'/'.join(FOLDER_IMAGE_TYPES)} files "
                                  "in its class sub-folders")

  def read(name: str, rows):
    images = []
    for path, _ in (files[name][r] for r in rows):
      try:
        img = tf.image.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
      except tf.errors.InvalidArgumentError as e:
        why = re.sub(r"\{\{.*?\}\}\s*", "", e.message).split(". ")[0]  # less TF's op-location prefix
        raise DatasetUnavailableError(f"dataset: {path!r} does not decode as an image ({why}); replace or remove "
                                      "it") from None
      images.append(resize_uint8(img[None], image_size)[0])
    labels = np.asarray([files[name][r][1] for r in rows], np.int32)
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8), labels

  images, labels, rows = select_split(split, f"folder:{root}", {k: len(v) for k, v in files.items()}, read)
  return images, labels, len(classes), rows


# ------------------------------------------------------------------ batches

def pretraining_dataset(data: ArrayDataset, *, seed: int, global_batch: int, num_chunks: int,
                        aug: augment.AugmentConfig, start_step: int = 0, num_steps: Optional[int] = None,
                        process_index: int = 0, process_count: int = 1, equiv_batch: Optional[int] = None,
                        equiv_pairs: Optional[int] = None, with_equivariance: bool = True,
                        prefetch: int = 2) -> tf.data.Dataset:
  """Batches of views for global steps start_step, start_step + 1, ...

  Yields dicts x1, x2 float32 [B_local, S, S, 3] (and e1, e2 for this process's
  share of the equiv_batch rows, config_lib.equivariance_rows, default all, with
  equiv_pairs augmentation pairs, default one per chunk), labels and step.
  """
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} is not divisible by the process count {process_count}")
  local = global_batch // process_count
  offset = process_index * local
  equiv_rows = config_lib.local_equivariance_rows(global_batch, num_chunks, equiv_batch, offset, local)
  n = tf.cast(len(data.images), tf.int64)
  spe = steps_per_epoch(len(data.images), global_batch)
  images = tf.constant(data.images)
  labels = tf.constant(data.labels)

  @_graph_only
  def batch_for_step(step):
    epoch = step // spe
    order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
    start = (step % spe) * global_batch + offset
    idx = order[start:start + local]
    views = augment.pretraining_views(tf.gather(images, idx), seed, step, aug, global_batch=global_batch,
                                      num_chunks=num_chunks, offset=offset, equiv_rows=equiv_rows,
                                      num_pairs=equiv_pairs, with_equivariance=with_equivariance)
    views["labels"] = tf.gather(labels, idx)
    views["step"] = step
    return views

  end = None if num_steps is None else start_step + num_steps
  steps = tf.data.Dataset.range(start_step, end if end is not None else 2**62)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(1, os.cpu_count() or 1)
  # One map stage over a fixed thread pool: AUTOTUNE parallelism without the
  # autotuner, whose model thread has nothing to tune here but made deleting
  # the iterator wait ~9 s at the end of every two-process smoke run
  # (UnboundedThreadPool::~LogicalThreadWrapper, py-spy). Same images/s on 2 cores.
  options.autotune.enabled = False
  return (steps.map(batch_for_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(prefetch).with_options(options))


def streaming_num_examples(name: str, split: str, data_dir: Optional[str], download: bool = False) -> int:
  """Examples in a streamed split (ImageNet-100: counted through the class filter, once)."""
  builder = _tfds_builder(_tfds_name(name), data_dir, download)
  _check_split(builder, name, split)
  if name != "imagenet100":
    try:
      return int(builder.info.splits[split].num_examples)  # tfds resolves slices ('train[:10%]')
    except KeyError:  # no split metadata (e.g. tfds' mock data): count below
      pass
  ds, _ = _class_subset(name, builder, builder.as_dataset(split=split, decoders=_skip_image_decoding()))
  labels = ds.map(lambda ex: ex["label"]).batch(65536)
  return int(labels.reduce(tf.constant(0, tf.int64), lambda n, y: n + tf.cast(tf.size(y), tf.int64)).numpy())


def _skip_image_decoding():
  import tensorflow_datasets as tfds  # noqa: PLC0415
  return {"image": tfds.decode.SkipDecoding()}


def _decoded_rgb(ex):
  """A streamed example's encoded image (_skip_image_decoding) as uint8 [H, W, 3]."""
  image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _process_part(split: str, process_index: int, process_count: int) -> str:
  """This process's part of a streamed split (the whole split for one process)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  return split if process_count == 1 else tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)


def streaming_num_classes(name: str, data_dir: Optional[str], download: bool = False) -> int:
  if name == "imagenet100":
    return len(IMAGENET100_CLASSES)
  return _tfds_builder(_tfds_name(name), data_dir, download).info.features["label"].num_classes


def _streaming_eval_examples(name: str, split: str, *, data_dir: Optional[str], download: bool,
                             image_size: int, process_index: int = 0, process_count: int = 1,
                             limit: int = 0) -> tf.data.Dataset:
  """A streamed split's centre-cropped uint8 images and labels, in order; this process's part."""
  builder = _tfds_builder(_tfds_name(name), data_dir, download)
  part = _process_part(split, process_index, process_count)
  ds, _ = _class_subset(name, builder, builder.as_dataset(split=part, decoders=_skip_image_decoding()))
  if limit:  # after the class filter, so a subset gets `limit` of its own examples
    ds = ds.take(-(-limit // process_count))

  def decode(ex):
    image = _decoded_rgb(ex)
    return {"image": _center_crop_uint8(image, image_size), "label": tf.cast(ex["label"], tf.int32)}

  return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load_streaming_head(name: str, split: str, n: int, *, data_dir: Optional[str], download: bool,
                        image_size: int) -> ArrayDataset:
  """The first n examples of a streamed split in memory (the Wahba subset), the same on every process."""
  ds = _streaming_eval_examples(name, split, data_dir=data_dir, download=download, image_size=image_size, limit=n)
  parts = list(ds.batch(1024).as_numpy_iterator())
  if not parts:
    raise DatasetUnavailableError(f"dataset: {name!r} split {split!r} is empty")
  return ArrayDataset(np.concatenate([p["image"] for p in parts]), np.concatenate([p["label"] for p in parts]),
                      streaming_num_classes(name, data_dir, download))


def streaming_eval_batches(name: str, split: str, *, data_dir: Optional[str], download: bool, image_size: int,
                           global_batch: int, aug: augment.AugmentConfig, process_index: int = 0,
                           process_count: int = 1, limit: int = 0, prefetch: int = 2) -> Iterator[dict]:
  """eval_batches for splits too large for memory: every example of this process's part once.

  Yields the same dicts as datasets.eval_batches (normalised images, labels,
  mask), read from the tfds stream with a centre crop and never holding more
  than a few batches. The processes' parts differ in size and are not counted
  in advance, so with several processes the stream goes on with all-padding
  batches (mask 0) after its last real one: a consumer stops at the first
  batch that is padding on every process (extract_features does), which keeps
  the processes in lockstep. One process ends after its last real batch.
  `limit` keeps about that many examples (ceil(limit / processes) each).
  """
  if global_batch % process_count:
    raise ValueError(f"eval batch {global_batch} is not divisible by the process count {process_count}")
  ds = _streaming_eval_examples(name, split, data_dir=data_dir, download=download, image_size=image_size,
                                process_index=process_index, process_count=process_count, limit=limit)
  for batch in _masked_batches(ds, global_batch // process_count, process_count, prefetch):
    yield {**batch, "images": normalized(batch["images"], aug)}


def _masked_batches(ds: tf.data.Dataset, local: int, process_count: int, prefetch: int) -> Iterator[dict]:
  """{"image", "label"} examples -> {images, labels, mask} batches of `local` rows, the last
  one padded with zeros (mask False); with several processes, all-padding batches follow
  forever, so that uneven parts stop together (see streaming_eval_batches)."""
  spec = ds.element_spec["image"]
  empty = lambda rows: np.zeros((rows, *spec.shape), spec.dtype.as_numpy_dtype)
  for batch in ds.batch(local).prefetch(prefetch).as_numpy_iterator():
    rows = len(batch["label"])
    yield {"images": np.concatenate([batch["image"], empty(local - rows)]),
           "labels": np.concatenate([batch["label"], np.zeros((local - rows,), np.int32)]),
           "mask": np.arange(local) < rows}
  while process_count > 1:
    yield {"images": empty(local), "labels": np.zeros((local,), np.int32), "mask": np.zeros((local,), bool)}


def streaming_lincls_batches(name: str, split: str, *, data_dir: Optional[str], download: bool,
                             aug: augment.AugmentConfig, global_batch: int, seed: int, epoch: int,
                             process_index: int = 0, process_count: int = 1, shuffle_buffer: int = 16384,
                             prefetch: int = 2) -> Iterator[dict]:
  """One epoch of MoCo lincls' training views of a streamed split (evaluate.lincls_probe).

  This process's part, read once in an order shuffled afresh every epoch (files
  and a buffer, seeded by (seed, epoch, process)); every image gets a
  RandomResizedCrop drawn on its own size and a flip (aug's crop_scale,
  crop_ratio, flip_prob, antialias), then the normalisation: main_lincls.py's
  train transform. Yields {images, labels, mask} batches of global_batch /
  process_count rows as streaming_eval_batches does, the last one padded.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415
  if global_batch % process_count:
    raise ValueError(f"linear_probe_batch_size={global_batch} is not divisible by the process count "
                     f"{process_count}")
  order_seed = int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0] >> 1)
  builder = _tfds_builder(_tfds_name(name), data_dir, download)
  part = _process_part(split, process_index, process_count)
  read_config = tfds.ReadConfig(shuffle_seed=order_seed)
  ds, _ = _class_subset(name, builder, builder.as_dataset(split=part, shuffle_files=True, read_config=read_config,
                                                          decoders=_skip_image_decoding()))
  ds = ds.shuffle(shuffle_buffer, seed=order_seed).enumerate()
  epoch_seed = augment.view_seed(seed, epoch, process_index)
  mean, std = tf.constant(aug.mean, tf.float32), tf.constant(aug.std, tf.float32)

  @_graph_only
  def view(index, ex):
    image = _decoded_rgb(ex)
    image_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
    flip = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(image_seed, 1)) < aug.flip_prob
    x = augment.random_resized_crop(image, tf.random.experimental.stateless_fold_in(image_seed, 0),
                                    aug.image_size, aug, flip=flip)
    return {"image": (x - mean) / std, "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from _masked_batches(ds, global_batch // process_count, process_count, prefetch)


def streaming_pretraining_dataset(name: str, split: str, *, data_dir: Optional[str], download: bool, seed: int,
                                  global_batch: int, num_chunks: int, aug: augment.AugmentConfig,
                                  start_step: int = 0, num_steps: Optional[int] = None, process_index: int = 0,
                                  process_count: int = 1, equiv_batch: Optional[int] = None,
                                  equiv_pairs: Optional[int] = None, with_equivariance: bool = True,
                                  shuffle_buffer: int = 16384, prefetch: int = 2) -> tf.data.Dataset:
  """Views for datasets too large for memory (imagenet2012, imagenet100), read as a tfds stream.

  Each process reads its own part of the split (tfds.split_for_jax_process),
  shuffled (files and a buffer, both seeded, order deterministic), repeated
  over epochs. Images of any size are decoded and then, per image, get
  their RandomResizedCrop (x1, x2; drawn on the image's own size) or a
  whole-image resize (e1, e2); batched, the rest of the augmentation runs
  vectorised as in the in-memory path, with the chunk-shared parameters of
  e1, e2 (and their crop, when equiv_crop, on the resized image). A resumed
  run skips the examples of the steps already taken (exact, at the cost of
  reading past them). Yields dicts like pretraining_dataset's.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} is not divisible by the process count {process_count}")
  local = global_batch // process_count
  offset = process_index * local
  equiv_rows = config_lib.local_equivariance_rows(global_batch, num_chunks, equiv_batch, offset, local)
  builder = _tfds_builder(_tfds_name(name), data_dir, download)
  part = _process_part(split, process_index, process_count)
  read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True)
  ds, _ = _class_subset(name, builder, builder.as_dataset(split=part, shuffle_files=True, read_config=read_config,
                                                          decoders=_skip_image_decoding()))
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  size = aug.image_size
  # Which rows of this process's batch get e1, e2: only their images are resized whole
  # (a resize of a full-size image per row costs as much as a crop; SimCLR / MoCo runs
  # need none, the ImageNet-100 CARE configs half of them).
  needs_e = np.zeros(local, bool)
  if with_equivariance:
    needs_e[slice(None) if equiv_rows is None else np.asarray(equiv_rows) - offset] = True
  needs_e = tf.constant(needs_e)

  @_graph_only
  def sources(index, ex):
    image = _decoded_rgb(ex)
    per_image = lambda view: tf.random.experimental.stateless_fold_in(
        augment.view_seed(seed, index, view), process_index)
    out = {"x1": augment.random_resized_crop(image, per_image(0), size, aug),
           "x2": augment.random_resized_crop(image, per_image(1), size, aug),
           "labels": tf.cast(ex["label"], tf.int32)}
    if with_equivariance:  # index % local: the row in its batch (batches start at multiples of local)
      out["e"] = tf.cond(needs_e[index % local], lambda: augment.resize_whole(image, size, aug.antialias),
                         lambda: tf.zeros([size, size, 3]))
    return out

  ds = ds.skip(start_step * local).enumerate(start_step * local)
  ds = ds.map(sources, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  whole = tf.constant([0.0, 0.0, float(size), float(size)])

  @_graph_only
  def views(step, batch):
    params = augment.view_params(seed, step, size, size, aug, global_batch=global_batch, num_chunks=num_chunks,
                                 rows=offset + tf.range(local), equiv_rows=equiv_rows, num_pairs=equiv_pairs,
                                 with_equivariance=with_equivariance)
    for view in ("x1", "x2"):  # already cropped per image, each to its own box
      params[view]["crop"] = tf.tile(whole[None], [local, 1])
    sources = {"x1": batch["x1"], "x2": batch["x2"]}
    if with_equivariance:
      sources["e1"] = sources["e2"] = augment.process_rows(batch["e"], equiv_rows, offset)
    out = {view: augment.apply(sources[view], p, aug) for view, p in params.items()}
    return {**out, "labels": batch["labels"], "step": step}

  ds = ds.enumerate(start_step).map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if num_steps is not None:
    ds = ds.take(num_steps)
  options = tf.data.Options()
  options.deterministic = True
  return ds.prefetch(prefetch).with_options(options)
