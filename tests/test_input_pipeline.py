"""input_pipeline.py: real Fashion-MNIST files, tfds mock data, batching, errors."""
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from care_jax import augment, config_lib, datasets, input_pipeline as ip

HAVE_FMNIST = os.path.exists(os.path.join(ip.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Debian's Fashion-MNIST files are not in {ip.FASHION_MNIST_DIR} "
                    "(apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_reads_the_real_idx_files():
  imgs, labels, _ = ip.load_fashion_mnist_idx("test")
  assert imgs.shape == (10000, 28, 28) and imgs.dtype == np.uint8
  assert np.array_equal(np.bincount(labels), np.full(10, 1000))  # balanced test split
  train = ip.load_dataset("fashion_mnist", "train", 32)
  assert train.images.shape == (60000, 32, 32, 3) and train.num_classes == 10
  assert np.array_equal(train.images[..., 0], train.images[..., 2])  # grey -> 3 equal channels
  # tfds' slice syntax on the IDX files: the same rows as slicing the arrays.
  part, part_labels = ip.load_fashion_mnist_idx("test[10%:25%]")[:2]
  assert np.array_equal(part, imgs[1000:2500]) and np.array_equal(part_labels, labels[1000:2500])
  # The TF-free resize (jax.image.resize) against TensorFlow's antialiased bilinear one.
  grey = np.repeat(imgs[:500, ..., None], 3, axis=-1)
  for size in (32, 20):
    ours = ip.resize_uint8(grey, size).astype(int)
    theirs = np.round(tf.image.resize(grey, [size, size], method="bilinear", antialias=True).numpy())
    diff = np.abs(ours - np.clip(theirs, 0, 255))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01


def _npz(tmp_path, n=40, size=8):
  rng = np.random.default_rng(0)
  path = tmp_path / "toy.npz"
  np.savez(path, images=rng.integers(0, 256, (n, size, size), dtype=np.uint8), labels=np.arange(n) % 4)
  return str(path)


def test_npz_source_and_resize(tmp_path):
  data = ip.load_dataset("npz:" + _npz(tmp_path), "train", 16)
  assert data.images.shape == (40, 16, 16, 3) and data.num_classes == 4


@pytest.mark.parametrize("damage, pattern", [
    ("truncated", r"is not a readable .npz archive \(File is not a zip file\)"),
    ("single_array", r"is not a readable .npz archive \(a single array \(.npy\), not an archive of arrays\)"),
    ("object_array", r"is not a readable .npz archive \(Object arrays cannot be loaded"),
    ("no_labels", r"lacks arrays \['labels'\]; it needs .* \(has \['images', 'y'\]\)"),
])
def test_damaged_npz_files_are_one_line_naming_the_file(tmp_path, damage, pattern):
  path = tmp_path / "toy.npz"
  if damage == "truncated":
    path.write_bytes(open(_npz(tmp_path), "rb").read()[:300])
  elif damage == "single_array":
    with open(path, "wb") as f:
      np.save(f, np.zeros((4, 8, 8), np.uint8))
  elif damage == "object_array":
    np.savez(path, images=np.array([None], dtype=object), labels=np.arange(1))
  else:
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
  with pytest.raises(ip.DatasetUnavailableError, match=pattern) as err:
    ip.load_dataset(f"npz:{path}", "train", 8)
  assert str(path) in str(err.value) and "\n" not in str(err.value)


def _pretrain(data, **kw):
  args = dict(seed=1, global_batch=8, num_chunks=2, aug=augment.AugmentConfig(image_size=8))
  args.update(kw)
  return ip.pretraining_dataset(data, **args)


def test_pretraining_batches_resume_and_shard_exactly(tmp_path):
  data = ip.load_dataset("npz:" + _npz(tmp_path), "train", 8)
  full = [b for b in _pretrain(data, num_steps=7).as_numpy_iterator()]
  assert [int(b["step"]) for b in full] == list(range(7))
  assert full[0]["x1"].shape == (8, 8, 8, 3) and full[0]["e2"].shape == (8, 8, 8, 3)
  # 5 steps per epoch: each epoch's labels are a permutation without repeats,
  # and epochs are shuffled differently.
  resumed = [b for b in _pretrain(data, start_step=4, num_steps=3).as_numpy_iterator()]
  for a, b in zip(full[4:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Two processes' halves make up the one-process global batch.
  halves = [next(_pretrain(data, num_steps=1, start_step=2, process_index=p, process_count=2).as_numpy_iterator())
            for p in (0, 1)]
  for k in ("x1", "x2", "e1", "e2", "labels"):
    np.testing.assert_allclose(np.concatenate([h[k] for h in halves]), full[2][k], atol=1e-6)


def test_an_equivariance_sub_batch_is_the_full_batchs_views_at_its_rows_in_each_process(tmp_path):
  # equiv_batch 4 of 8, 2 chunks: rows 0, 1 and 4, 5 (the first 2 of each block of 4) get e1, e2,
  # with the parameters the whole batch's views of those rows have; process 1 of 2 holds rows 4, 5.
  data = ip.load_dataset("npz:" + _npz(tmp_path), "train", 8)
  assert config_lib.equivariance_rows(8, 2, 4).tolist() == [0, 1, 4, 5]
  full = next(_pretrain(data, num_steps=1, start_step=3).as_numpy_iterator())
  for process, local_rows in ((None, [0, 1, 4, 5]), (1, [0, 1])):
    kw = {} if process is None else dict(process_index=process, process_count=2)
    sub = next(_pretrain(data, num_steps=1, start_step=3, equiv_batch=4, **kw).as_numpy_iterator())
    first = 0 if process is None else 4
    for view in ("x1", "x2", "labels"):  # the other views are untouched
      np.testing.assert_array_equal(sub[view], full[view][first:first + len(sub["labels"])])
    for view in ("e1", "e2"):
      assert sub[view].shape == (len(local_rows), 8, 8, 3)
      np.testing.assert_allclose(sub[view], full[view][first:][local_rows], atol=1e-6, err_msg=view)


def test_epoch_is_a_permutation(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "ids.npz"
  np.savez(path, images=rng.integers(0, 256, (16, 4, 4), dtype=np.uint8), labels=np.arange(16))
  data = ip.load_dataset("npz:" + str(path), "train", 4)
  batches = list(_pretrain(data, global_batch=4, num_steps=8).as_numpy_iterator())
  epoch0 = np.concatenate([b["labels"] for b in batches[:4]])
  epoch1 = np.concatenate([b["labels"] for b in batches[4:]])
  assert sorted(epoch0) == list(range(16)) and sorted(epoch1) == list(range(16))
  assert not np.array_equal(epoch0, epoch1)


def test_eval_batches_cover_every_example_once(tmp_path):
  data = ip.load_dataset("npz:" + _npz(tmp_path, n=21), "test", 8)
  aug = augment.AugmentConfig(image_size=8)
  seen = []
  for p in (0, 1):
    for b in ip.eval_batches(data, global_batch=8, aug=aug, process_index=p, process_count=2):
      assert b["images"].shape == (4, 8, 8, 3)
      seen.extend(b["labels"][b["mask"]].tolist())
  assert sorted(seen) == sorted(data.labels.tolist())


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    data = ip.load_dataset("cifar10", "train", 16, download=True)
  assert data.images.shape == (12, 16, 16, 3) and data.num_classes == 10


@pytest.mark.parametrize("name,pattern", [
    ("npz:/nonexistent/x.npz", "npz file '/nonexistent/x.npz' does not exist"),
    ("folder:/nonexistent", "image folder '/nonexistent' does not exist"),
    ("no_such_dataset_xyz", "unknown dataset 'no_such_dataset_xyz'"),
    ("cifar10", "is not prepared under .* this run does not download"),
])
def test_unavailable_datasets_fail_fast_with_one_line(name, pattern, tmp_path):
  t0 = time.time()
  with pytest.raises(ip.DatasetUnavailableError, match=pattern) as err:
    ip.load_dataset(name, "train", 8, data_dir=str(tmp_path))
  assert time.time() - t0 < 10
  assert "\n" not in str(err.value)


def test_image_folder_source_resizes_mixed_sizes(tmp_path):
  rng = np.random.default_rng(2)
  for cls, sizes in (("cat", (12, 20)), ("dog", (8,))):
    (tmp_path / cls).mkdir()
    for i, s in enumerate(sizes):
      pixels = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
      tf.io.write_file(str(tmp_path / cls / f"{i}.png"), tf.io.encode_png(pixels))
  # Files that are not images are no samples (torchvision's ImageFolder takes image extensions only).
  (tmp_path / "cat" / "README.txt").write_text("photos by ...")
  (tmp_path / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  data = ip.load_dataset("folder:" + str(tmp_path), "train", 8)
  assert data.images.shape == (3, 8, 8, 3) and data.images.dtype == np.uint8
  assert data.labels.tolist() == [0, 0, 1] and data.num_classes == 2
  # The 8x8 image is already at size: it comes back unchanged.
  original = tf.io.decode_png(tf.io.read_file(str(tmp_path / "dog" / "0.png"))).numpy()
  np.testing.assert_array_equal(data.images[2], original)


def test_image_folder_with_a_broken_image_or_none_is_one_line(tmp_path):
  (tmp_path / "cat").mkdir()
  (tmp_path / "cat" / "notes.txt").write_text("no images here")
  with pytest.raises(ip.DatasetUnavailableError, match=r"has no .jpg/.jpeg/.png/.bmp/.gif files in its class"):
    ip.load_dataset("folder:" + str(tmp_path), "train", 8)
  (tmp_path / "cat" / "0.jpg").write_bytes(b"\xff\xd8\xff\xe0 a cut-off download")
  with pytest.raises(ip.DatasetUnavailableError,
                     match=r"cat/0.jpg' does not decode as an image \(jpeg::Uncompress failed\); replace or remove it$"):
    ip.load_dataset("folder:" + str(tmp_path), "train", 8)


def test_imagenet100_streams_the_subset_resumes_exactly_and_splits_across_processes():
  import tensorflow_datasets as tfds
  aug = augment.AugmentConfig(image_size=16, equiv_crop=False)
  # A small shuffle buffer: the default 16384 would make the mock generate that many images first.
  args = dict(data_dir=None, download=True, seed=0, global_batch=4, num_chunks=2, aug=aug, shuffle_buffer=64)
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    full = list(ip.streaming_pretraining_dataset("imagenet2012", "train", num_steps=3, **args).as_numpy_iterator())
    resumed = list(ip.streaming_pretraining_dataset("imagenet2012", "train", start_step=2, num_steps=1,
                                                    **args).as_numpy_iterator())
    subset = ip.load_dataset("imagenet100", "validation", 16, download=True)
    builder = tfds.builder("imagenet2012")
    names = builder.info.features["label"].names
    everything = ip.load_dataset("imagenet2012", "validation", 16, download=True)
    part0 = list(ip.streaming_pretraining_dataset("imagenet2012", "train", num_steps=2, process_index=0,
                                                  process_count=2, **args).as_numpy_iterator())
    sub = list(ip.streaming_pretraining_dataset("imagenet2012", "train", num_steps=1, equiv_batch=2,
                                                **args).as_numpy_iterator())
  assert [b["step"] for b in full] == [0, 1, 2]
  for key in ("x1", "x2", "e1", "e2", "labels"):
    assert full[0][key].shape[0] == 4
    np.testing.assert_array_equal(resumed[0][key], full[2][key])  # start at any step, same batch
  # equiv_crop=False and one parameter set per chunk: the chunk's e1 views differ only by the image.
  assert full[0]["e1"].shape == (4, 16, 16, 3)
  # The subset keeps exactly the examples whose class is one of the 100, relabelled 0..99 in list order.
  kept = [names[y] for y in everything.labels if names[y] in ip.IMAGENET100_CLASSES]
  assert kept and [ip.IMAGENET100_CLASSES[y] for y in subset.labels] == kept and subset.num_classes == 100
  assert len(ip.IMAGENET100_CLASSES) == len(set(ip.IMAGENET100_CLASSES)) == 100
  # Two processes: each process yields its half of the global batch.
  assert part0[0]["x1"].shape[0] == 2
  # An equivariance sub-batch of 2 (rows 0 and 2, one per chunk): the same views at those rows.
  for key in ("x1", "x2", "labels"):
    np.testing.assert_array_equal(sub[0][key], full[0][key])
  for key in ("e1", "e2"):
    np.testing.assert_allclose(sub[0][key], full[0][key][[0, 2]], atol=1e-6)


def _write_idx(path, array):
  import gzip  # noqa: PLC0415
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def test_fashion_mnist_idx_files_under_data_dir_come_first(tmp_path):
  # A machine without the Debian package (the GPU one) carries the files and passes data_dir.
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), np.arange(30) % 10
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
  data = ip.load_dataset("fashion_mnist", "test[:20]", 28, data_dir=str(tmp_path))
  assert np.array_equal(data.images[..., 1], images[:20]) and np.array_equal(data.labels, labels[:20])


@pytest.mark.parametrize("damage, pattern", [
    ("truncated", r"t10k-images-idx3-ubyte.gz' is not a complete IDX file \(unreadable: Compressed file ended"),
    ("short", r"t10k-images-idx3-ubyte.gz' is not a complete IDX file \(23500 bytes of data for shape \[30, 28, 28\]"),
    ("foreign", r"t10k-images-idx3-ubyte.gz' is not a complete IDX file \(not a uint8 IDX file\)"),
    ("unpaired", r"holds 30 images but .*t10k-labels-idx1-ubyte.gz' 29 labels; give both files of one split"),
])
def test_damaged_idx_files_are_one_line_naming_the_file(tmp_path, damage, pattern):
  import gzip  # noqa: PLC0415
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), np.arange(30) % 10
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  _write_idx(path, images)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:29] if damage == "unpaired" else labels)
  if damage == "truncated":
    path.write_bytes(path.read_bytes()[:200])
  elif damage == "short":
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-20]))
  elif damage == "foreign":
    path.write_bytes(gzip.compress(b"<html>not found</html>"))
  with pytest.raises(ip.DatasetUnavailableError, match=pattern) as err:
    ip.load_dataset("fashion_mnist", "test", 28, data_dir=str(tmp_path))
  assert "\n" not in str(err.value)


def test_streamed_evaluation_matches_the_in_memory_split_and_features():
  # ImageNet-size splits are never loaded whole for evaluation: features come from a stream.
  import pathlib  # noqa: PLC0415

  import tensorflow_datasets as tfds  # noqa: PLC0415

  from care_jax import config_lib, evaluate, train  # noqa: PLC0415
  aug = augment.AugmentConfig(image_size=16)
  with tfds.testing.mock_data(num_examples=21, policy=tfds.testing.MockPolicy.USE_CODE):
    whole = ip.load_dataset("imagenet2012", "validation", 16, download=True)
    one = list(ip.streaming_eval_batches("imagenet2012", "validation", data_dir=None, download=True,
                                         image_size=16, aug=aug, global_batch=8))
    config = config_lib.load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py",
                                         "smoke")
    config.dataset, config.test_split, config.eval_train_split = "imagenet2012", "validation", "validation"
    config.eval_batch_size, config.wahba_examples, config.wahba_trials = 8, 5, 1
    config.download = True  # tfds mock data stands in for a prepared copy
    mesh = train.make_mesh()
    model = train.build_model(config)
    variables = train.random_init_variables(model, config, mesh)
    evaluator = evaluate.RunEvaluator(config, model, mesh, log=lambda m: None)
    streamed = evaluator.features(variables, "t", "validation")
    wahba = evaluator.wahba(variables, "t")
    num_classes = evaluator.num_classes()
  # One process: the split in order, the last batch padded and masked.
  assert [int(b["mask"].sum()) for b in one] == [8, 8, 5]
  np.testing.assert_array_equal(np.concatenate([b["images"][b["mask"]] for b in one]),
                                ip.normalized(whole.images, aug))
  np.testing.assert_array_equal(np.concatenate([b["labels"][b["mask"]] for b in one]), whole.labels)
  # The evaluator on a streamed dataset: the same features as embedding the in-memory split.
  f_expected, _, y_expected = evaluate.extract_features(
      evaluator.embed_fn, variables, ip.eval_batches(whole, global_batch=8, aug=evaluator.aug), evaluator.to_global)
  np.testing.assert_allclose(streamed[0], f_expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(streamed[2], y_expected)
  assert num_classes == 1000 and wahba["wahba_examples"] == 5 and len(wahba["wahba_trials"]) == 1
  assert ("validation" not in evaluator._data) and (None not in evaluator._data)  # no whole split loaded


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """A real tfds dataset on disk, as tfds' mock data ignores split slicing, which the
  per-process parts are made of: 21 images of 3 classes in three configs,
  'tiny_images/any_size' (a 'validation' split of sides 12-29, declared of unknown size
  as ImageNet's, so its evaluation view is a resize and centre crop),
  'tiny_images/square' ('train', 16x16: the lincls views' whole-image crops) and
  'tiny_images/same' ('train', one 16x16 image 21 times: views differ by their
  augmentation alone)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in ("any_size", "square", "same")]

    def _info(self):
      shape = (None, None, 3) if self.builder_config.name == "any_size" else (16, 16, 3)
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=shape), "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      any_size = self.builder_config.name == "any_size"
      return {"validation" if any_size else "train": self._generate_examples(any_size)}

    def _generate_examples(self, any_size):
      rng = np.random.default_rng(0 if any_size else 1)
      same = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
      for i in range(21):
        h, w = rng.integers(12, 30, 2) if any_size else (16, 16)
        image = same if self.builder_config.name == "same" else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        yield i, {"image": image, "label": i % 3}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for config in TinyImages.BUILDER_CONFIGS:
    TinyImages(config=config, data_dir=data_dir).download_and_prepare()
  return data_dir


def test_streamed_evaluation_parts_of_several_processes_cover_each_example_once(tiny_tfds_dir):
  aug = augment.AugmentConfig(image_size=16)
  common = dict(data_dir=tiny_tfds_dir, download=False, image_size=16, aug=aug, global_batch=8)
  whole = ip.load_dataset("tiny_images/any_size", "validation", 16, data_dir=tiny_tfds_dir)
  parts = [ip.streaming_eval_batches("tiny_images/any_size", "validation", process_index=p, process_count=2,
                                     **common) for p in (0, 1)]
  two = []
  while True:  # what extract_features does: stop at the first batch that is padding everywhere
    pair = [next(it) for it in parts]
    if not any(b["mask"].any() for b in pair):
      break
    two.extend(pair)
  got = np.concatenate([b["images"][b["mask"]] for b in two])
  expected = ip.normalized(whole.images, aug)
  key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
  assert len(got) == len(expected) == 21 and key(got) == key(expected)
  assert all(b["images"].shape == (4, 16, 16, 3) for b in two)  # half the global batch per process
  head = ip.load_streaming_head("tiny_images/any_size", "validation", 5, data_dir=tiny_tfds_dir, download=False,
                                image_size=16)
  np.testing.assert_array_equal(head.images, whole.images[:5])
  # A split the dataset lacks is one line naming its splits, from the metadata alone.
  bad = (r"'tiny_images/any_size' has no split 'valid' \(in 'validation\[:5\]\+valid'\); its splits are "
         r'validation. Did you mean "validation"\?$')
  for read in (lambda: ip.load_dataset("tiny_images/any_size", "validation[:5]+valid", 16, data_dir=tiny_tfds_dir),
               lambda: ip.streaming_num_examples("tiny_images/any_size", "validation[:5]+valid", tiny_tfds_dir),
               lambda: ip.check_split("tiny_images/any_size", "validation[:5]+valid", tiny_tfds_dir)):
    with pytest.raises(ip.DatasetUnavailableError, match=bad):
      read()
  with pytest.raises(ip.DatasetUnavailableError, match=r"no split 'test' \(in 'test'\); its splits are validation.$"):
    ip.check_split("tiny_images/any_size", "test", tiny_tfds_dir)
  assert ip.streaming_num_examples("tiny_images/any_size", "validation[:5]+validation[10:]", tiny_tfds_dir) == 16


def test_slices_of_one_tfds_split_know_the_examples_they_share(tiny_tfds_dir):
  read = lambda spec: ip.load_dataset("tiny_images/any_size", spec, 16, data_dir=tiny_tfds_dir)  # noqa: E731
  head, tail, whole = read("validation[:15]"), read("validation[10:]"), read("validation")
  np.testing.assert_array_equal(head.rows["validation"], np.arange(15))
  np.testing.assert_array_equal(tail.images, whole.images[10:])  # rows as tfds numbers them
  assert datasets.shared_examples(head, tail) == 5 and datasets.shared_examples(read("validation[-6:]"), head) == 0


def test_streamed_pretraining_views_of_two_processes_are_drawn_apart(tiny_tfds_dir):
  # One image 21 times, crops alone: a row's x1 / x2 differ from another's by its box. Each
  # process's stream numbers its own examples from 0, so its draws must also depend on
  # the process, or the two halves of every global batch would share their crops.
  aug = augment.AugmentConfig(image_size=16, equiv_crop=False, flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                              blur_prob=0.0)  # the crop is each row's only random transform
  halves = [next(ip.streaming_pretraining_dataset(
      "tiny_images/same", "train", data_dir=tiny_tfds_dir, download=False, seed=0, global_batch=8, num_chunks=2,
      aug=aug, num_steps=1, process_index=p, process_count=2, shuffle_buffer=8).as_numpy_iterator()) for p in (0, 1)]
  for view in ("x1", "x2"):
    rows = np.concatenate([h[view] for h in halves])
    assert len({x.tobytes() for x in rows}) == 8, view  # every row of the global batch its own crop
    assert not np.allclose(halves[0][view], halves[1][view])


def test_streamed_lincls_views_cover_each_example_once_and_train_as_the_in_memory_probe(tiny_tfds_dir):
  # MoCo lincls' training views of a streamed split (ImageNet-100's probe).
  import jax  # noqa: PLC0415

  from care_jax import evaluate, train  # noqa: PLC0415

  whole = ip.load_dataset("tiny_images/square", "train", 16, data_dir=tiny_tfds_dir)
  # Whole-image crops, every one flipped: each view is its image mirrored, normalised.
  mirrored = augment.AugmentConfig(image_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0)
  stream = lambda aug, epoch, batch=8, **kw: ip.streaming_lincls_batches(  # noqa: E731
      "tiny_images/square", "train", data_dir=tiny_tfds_dir, download=False, aug=aug, global_batch=batch, seed=0,
      epoch=epoch, **kw)
  parts = [stream(mirrored, 0, process_index=p, process_count=2) for p in (0, 1)]
  two = []
  while True:  # as lincls_probe: stop at the first batch that is padding on every process
    pair = [next(it) for it in parts]
    if not any(b["mask"].any() for b in pair):
      break
    two.extend(pair)
  assert all(b["images"].shape == (4, 16, 16, 3) for b in two)
  key = lambda images, labels: sorted(bytes(x) + bytes([y]) for x, y in zip(images, labels))  # noqa: E731
  got = key(np.concatenate([b["images"][b["mask"]] for b in two]), np.concatenate([b["labels"][b["mask"]] for b in two]))
  assert got == key(ip.normalized(whole.images[:, :, ::-1], mirrored), whole.labels)
  # Every epoch its own order and crops (the default RandomResizedCrop + flip).
  default = augment.AugmentConfig(image_size=16)
  first = [next(stream(default, epoch)) for epoch in (0, 1)]
  assert not np.array_equal(first[0]["labels"], first[1]["labels"])
  assert next(stream(default, 0))["images"].tobytes() == first[0]["images"].tobytes()  # and reproducible
  # One image 21 times: the views differ by their crops and flips alone, which differ per epoch.
  same = [next(ip.streaming_lincls_batches("tiny_images/same", "train", data_dir=tiny_tfds_dir, download=False,
                                           aug=default, global_batch=8, seed=0, epoch=epoch))["images"]
          for epoch in (0, 1)]
  assert all(len({x.tobytes() for x in views}) == 8 for views in same)
  assert not any(np.array_equal(a, b) for a, b in zip(*same))

  # The probe on the stream equals the probe on the split in memory when a batch holds the
  # whole split (one step an epoch: the mean gradient is order-free), short batch masked.
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"),
                                       "smoke")
  mesh = train.make_mesh()
  model = train.build_model(config)
  variables = train.random_init_variables(model, config, mesh)
  test_f = np.asarray(model.apply(variables, ip.normalized(whole.images, mirrored), train=False)[0])
  common = dict(test_features=test_f, test_labels=whole.labels, num_classes=3, aug=mirrored, mesh=mesh, epochs=2,
                learning_rate=0.5, weight_decay=0.01, batch_size=24, drop_epochs=(1,), seed=4)
  streamed = evaluate.lincls_probe(model, variables, lambda epoch: stream(mirrored, epoch, batch=24),
                                   to_global=train.global_batch_builder(mesh), **common)
  in_memory = evaluate.lincls_probe(model, variables, images=whole.images, labels=whole.labels, **common)
  for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(streamed["classifier"][k]), np.asarray(in_memory["classifier"][k]),
                               rtol=1e-4, atol=1e-6)
  assert not np.allclose(np.asarray(in_memory["classifier"]["w"]),
                         np.asarray(evaluate.lincls_classifier_init(jax.random.split(jax.random.PRNGKey(4))[0],
                                                                    test_f.shape[1], 3)["w"]))
