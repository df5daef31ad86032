"""datasets.py's split specs against tfds' own resolution, and the splits of npz and folder sources."""
import types

import numpy as np
import pytest

from care_jax import datasets


def _tfds_rows(spec: str, sizes: dict) -> list:
  """[(split name, row indices)] of each part, as tfds itself resolves the spec."""
  from tensorflow_datasets.core import splits as tfds_splits  # noqa: PLC0415 (the independent truth)
  infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}
  return [(a.splitname, np.arange(sizes[a.splitname])[a.from_:a.to])
          for a in tfds_splits.ReadInstruction.from_spec(spec).to_absolute(infos)]


def _our_rows(spec: str, sizes: dict) -> list:
  """The same through select_split, whose reader returns each row's (split, index) as its 'image'."""
  read = lambda name, rows: (np.array([(name, r) for r in rows], dtype=object).reshape(-1, 2), rows)
  images, labels, _ = datasets.select_split(spec, "toy", sizes, read)
  return [(name, np.asarray([r for n, r in images if n == name], int)) for name in dict.fromkeys(images[:, 0])]


SPECS = ["train", "test", "train[:2000]", "train[5:]", "train[-1000:]", "train[:-3]", "train[10%:50%]",
         "train[:-10%]", "train[-25%:]", "train[33%:67%]", "train[12.5%:87.5%]", "train[:1%]", "train[0%:0%]",
         "train[-100%:-99%]", "train[:10%]+test", "test[5:7]+train[-3:]", "train[:70000]", "train[:120%]",
         "train[-101%:]", "train[1.5:]", "train[5]", "train[:]", "train[a:b]", "train[10%:2500]", "train+test[:50%]"]


@pytest.mark.parametrize("train_size", [1, 7, 99, 100, 101, 999, 12345, 60000])
def test_split_specs_select_the_rows_tfds_selects_and_refuse_what_it_refuses(train_size):
  sizes = {"train": train_size, "test": 37}
  for spec in SPECS:
    try:
      want = _tfds_rows(spec, sizes)
    except (ValueError, NotImplementedError):
      with pytest.raises(datasets.DatasetUnavailableError) as err:
        _our_rows(spec, sizes)
      assert repr(spec) in str(err.value) and "\n" not in str(err.value), spec
      continue
    got = _our_rows(spec, sizes)
    # Parts of one split come back merged per name in _our_rows: compare the same way.
    merged = {}
    for name, rows in want:
      merged[name] = np.concatenate([merged.get(name, np.zeros(0, int)), rows])
    if not all(len(r) for r in merged.values()):
      continue  # an empty part: load_dataset refuses an empty result as a whole
    assert [n for n, _ in got] == list(merged), spec
    for name, rows in got:
      np.testing.assert_array_equal(rows, merged[name], err_msg=f"{spec} ({name}, n={train_size})")


def test_split_spec_errors_name_the_spec_and_the_fix():
  sizes = {"train": 60000, "test": 10000}
  cases = {
      # tfds reads both bounds in the first one's unit (10% .. 2500%): refused, with both ways to say it.
      "train[1%:2]": "mixes a percentage and a row number in [1%:2]; give both bounds in one unit, "
                     "e.g. train[10%:25%] or train[1000:2500]",
      "train[:70000]": "reaches row 70000 of toy's 'train', which holds 60000 examples; use bounds within "
                       "-60000 and 60000, or a percentage (train[:50%])",
      "train[:120%]": "reaches 120% of toy's 'train'; percentages lie within -100% and 100%",
      "train[1.5:]": "has a fractional row number in [1.5:]; rows are whole numbers",
      "validation": "toy has no split 'validation' (in 'validation'); its splits are test, train.",
      "tset[:10]": 'toy has no split \'tset\' (in \'tset[:10]\'); its splits are test, train. Did you mean "test"?',
      "train[::2]": "is not understood; use e.g. train, test, train[:2000], test[10%:50%]",
  }
  for spec, expected in cases.items():
    with pytest.raises(datasets.DatasetUnavailableError) as err:
      datasets.select_split(spec, "toy", sizes, lambda name, rows: (rows, rows))
    assert expected in str(err.value), (spec, str(err.value))


def _images(rng, n, size=8):
  return rng.integers(0, 256, (n, size, size), dtype=np.uint8)


def test_npz_archives_of_one_set_or_of_named_splits(tmp_path):
  rng = np.random.default_rng(0)
  one = tmp_path / "one.npz"
  images, labels = _images(rng, 40), np.arange(40) % 4
  np.savez(one, images=images, labels=labels)
  # One set: every split name reads it, slices apply, and the rows read are recorded.
  head = datasets.load_dataset(f"npz:{one}", "train[:75%]", 8)
  tail = datasets.load_dataset(f"npz:{one}", "test[-10:]", 8)
  np.testing.assert_array_equal(head.images[..., 0], images[:30])
  np.testing.assert_array_equal(tail.labels, labels[30:])
  assert head.num_classes == tail.num_classes == 4
  assert datasets.shared_examples(head, tail) == 0
  assert datasets.shared_examples(datasets.load_dataset(f"npz:{one}", "train", 8), tail) == 10
  ends = datasets.load_dataset(f"npz:{one}", "train[:5]+train[-5:]", 8)  # two parts of the one set
  assert datasets.shared_examples(ends, tail) == 5 and datasets.shared_examples(ends, head) == 5

  # Named splits, ours and Keras' (mnist.npz: x_train, y_train, x_test, y_test).
  train, test = (_images(rng, 30), np.arange(30) % 5), (_images(rng, 12), np.full(12, 1))
  for name, arrays in (("ours", dict(train_images=train[0], train_labels=train[1], test_images=test[0],
                                     test_labels=test[1])),
                       ("keras", dict(x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1]))):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    got_train = datasets.load_dataset(f"npz:{path}", "train[:20]", 8)
    got_test = datasets.load_dataset(f"npz:{path}", "test", 8)
    np.testing.assert_array_equal(got_train.images[..., 2], train[0][:20])
    np.testing.assert_array_equal(got_test.labels, test[1])
    # One class count for both: the test split's labels are all 1, the train split's 0..4.
    assert got_train.num_classes == got_test.num_classes == 5
    assert datasets.shared_examples(got_train, got_test) == 0
    both = datasets.load_dataset(f"npz:{path}", "train[:5]+test[:2]", 8)
    np.testing.assert_array_equal(both.labels, np.concatenate([train[1][:5], test[1][:2]]))
    with pytest.raises(datasets.DatasetUnavailableError, match=r"has no split 'val' \(in 'val'\); its splits are "
                                                              r"test, train\.$"):
      datasets.load_dataset(f"npz:{path}", "val", 8)

  unpaired = tmp_path / "unpaired.npz"
  np.savez(unpaired, train_images=train[0], train_labels=train[1][:29])
  with pytest.raises(datasets.DatasetUnavailableError, match=r"split 'train' holds 30 images but 29 labels"):
    datasets.load_dataset(f"npz:{unpaired}", "train", 8)


def test_folder_sources_of_one_set_or_of_split_folders_decode_only_the_rows_asked_for(tmp_path):
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(1)

  def write(folder, n):
    folder.mkdir(parents=True)
    for i in range(n):
      tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))

  # ImageNet's layout: root/<split>/<class>/; the val split lacks a class the train split has.
  root = tmp_path / "by_split"
  write(root / "train" / "cat", 3)
  write(root / "train" / "dog", 2)
  write(root / "train" / "eel", 1)
  write(root / "val" / "dog", 2)
  train = datasets.load_dataset(f"folder:{root}", "train", 8)
  val = datasets.load_dataset(f"folder:{root}", "val", 8)
  assert train.labels.tolist() == [0, 0, 0, 1, 1, 2] and val.labels.tolist() == [1, 1]  # one labelling
  assert train.num_classes == val.num_classes == 3 and datasets.shared_examples(train, val) == 0
  original = tf.io.decode_png(tf.io.read_file(str(root / "val" / "dog" / "1.png"))).numpy()
  np.testing.assert_array_equal(val.images[1], original)
  with pytest.raises(datasets.DatasetUnavailableError, match=r"has no split 'test' \(in 'test'\); its splits are "
                                                            r"train, val\.$"):
    datasets.load_dataset(f"folder:{root}", "test", 8)

  # One set (root/<class>/): slices apply, and a broken file outside them is never decoded.
  flat = tmp_path / "flat"
  write(flat / "cat", 4)
  write(flat / "dog", 4)
  (flat / "dog" / "3.png").write_bytes(b"\x89PNG cut off")
  head = datasets.load_dataset(f"folder:{flat}", "train[:50%]", 8)
  assert head.labels.tolist() == [0, 0, 0, 0] and list(head.rows) == [""]
  np.testing.assert_array_equal(head.rows[""], np.arange(4))
  with pytest.raises(datasets.DatasetUnavailableError, match=r"dog/3.png' does not decode as an image"):
    datasets.load_dataset(f"folder:{flat}", "test[50%:]", 8)
