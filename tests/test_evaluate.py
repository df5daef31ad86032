"""Evaluators and writers against independent truth."""

import json
import time

import jax
import numpy as np
import pytest

from care_jax import evaluate, geometry, metric_writers


def _brute_force_knn_scores(bank, bank_y, queries, num_classes, k, t):
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  out = np.zeros((len(queries), num_classes))
  for row, q in enumerate(queries):
    sims = bank @ q
    for i in np.argsort(-sims, kind="stable")[:k]:
      out[row, bank_y[i]] += np.exp(sims[i] / t)
  return out


def _brute_force_knn(bank, bank_y, queries, num_classes, k, t):
  scores = _brute_force_knn_scores(bank, bank_y, queries, num_classes, k, t)
  return np.argsort(-scores, axis=1, kind="stable")


# bank_chunk: the whole bank at once; blocks of 64 (the last one padded); blocks
# of 7, fewer rows than k, so the top 15 is assembled across several blocks.
@pytest.mark.parametrize("bank_chunk", [65536, 64, 7])
def test_knn_matches_a_brute_force_numpy_version(bank_chunk):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 12))
  bank_y = rng.integers(0, 5, 300)
  bank = centers[bank_y] + 1.5 * rng.normal(size=(300, 12))
  query_y = rng.integers(0, 5, 77)  # not a multiple of the chunk: padding must not count
  queries = centers[query_y] + 1.5 * rng.normal(size=(77, 12))
  got = evaluate.knn_accuracy(bank, bank_y, queries, query_y, num_classes=5, k=15, temperature=0.3, chunk=32,
                                 bank_chunk=bank_chunk)
  ranked = _brute_force_knn(bank, bank_y, queries, 5, 15, 0.3)
  assert got["top1"] == pytest.approx(100 * np.mean(ranked[:, 0] == query_y))
  assert got["top5"] == pytest.approx(100 * np.mean(np.any(ranked[:, :5] == query_y[:, None], axis=1)))
  assert got["top5"] == 100.0 and 20.0 < got["top1"] < 100.0


@pytest.mark.parametrize("bank_chunk", [65536, 64, 7])
def test_knn_scores_match_brute_force_when_k_reaches_far_neighbours(bank_chunk):
  # k = 250 of 300 bank rows: the top k holds negative similarities, so a padded
  # (zero, similarity 0) row of a short last block would displace real ones.
  rng = np.random.default_rng(4)
  bank, bank_y = rng.normal(size=(300, 6)), rng.integers(0, 4, 300)
  queries = rng.normal(size=(45, 6))
  got = evaluate.knn_scores(bank, bank_y, queries, num_classes=4, k=250, temperature=0.2, chunk=16,
                            bank_chunk=bank_chunk)
  np.testing.assert_allclose(got, _brute_force_knn_scores(bank, bank_y, queries, 4, 250, 0.2), rtol=1e-4)


def _numpy_softmax_grads(p, f, labels, classes, mask=None):
  """Gradient of the mean softmax cross-entropy of f @ w + b (over the rows of `mask`)."""
  logits = f @ p["w"] + p["b"]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  weights = np.ones(len(f)) if mask is None else np.asarray(mask, np.float64)
  d = (probs - np.eye(classes)[labels]) * weights[:, None] / weights.sum()
  return {"w": f.T @ d, "b": d.sum(0)}


def _numpy_adam_l2_step(p, grads, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam with weight_decay, written out: g += wd p, then Adam."""
  out = {}
  for k in p:
    g = grads[k] + wd * p[k]
    m[k] = b1 * m[k] + (1 - b1) * g
    v[k] = b2 * v[k] + (1 - b2) * g * g
    out[k] = p[k] - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
  return out


def test_linear_probe_separates_linearly_separable_features():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(16, 4))
  x = rng.normal(size=(2000, 16)).astype(np.float32)
  y = np.argmax(x @ w, axis=1)
  result = evaluate.linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], num_classes=4, epochs=60,
                                 learning_rate=1e-2, batch_size=128)
  assert result["top1"] > 95.0 and result["top5"] == 100.0


def test_linear_probe_on_label_independent_features_is_near_chance():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2000, 8)).astype(np.float32)
  y = rng.integers(0, 4, 2000)
  result = evaluate.linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], num_classes=4, epochs=20)
  assert result["top1"] < 40.0


def test_probe_classifiers_start_as_the_releases_do():
  # torch.nn.Linear (the release's linear.py): weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  dim, classes = 64, 4000
  bound = 1 / np.sqrt(dim)
  p = jax.device_get(evaluate._classifier_init(jax.random.PRNGKey(0), dim, classes))
  for name, x in p.items():
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.99 * bound, name
    np.testing.assert_allclose(x.std(), bound / np.sqrt(3), rtol=0.03, err_msg=name)
    assert abs(x.mean()) < 0.02 * bound, name
  assert abs(np.corrcoef(p["w"][0], p["b"])[0, 1]) < 0.1  # independent draws
  # main_lincls.py: weight N(0, 0.01^2), bias 0.
  p = jax.device_get(evaluate.lincls_classifier_init(jax.random.PRNGKey(0), dim, classes))
  np.testing.assert_allclose(p["w"].std(), 0.01, rtol=0.02)
  assert abs(p["w"].mean()) < 2e-4 and not p["b"].any()


def test_features_probe_is_adam_with_l2_over_every_row_each_epoch_as_a_numpy_loop():
  # Reference: the softmax gradient and torch's Adam + L2 in NumPy, float64, over
  # each epoch's permutation cut into batches of 32, 32 and the partial 11.
  rng = np.random.default_rng(5)
  n, dim, classes, batch, epochs, lr, wd = 75, 6, 3, 32, 3, 1e-2, 0.1
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = rng.integers(0, classes, n)
  got = evaluate.train_linear_classifier(x, y, num_classes=classes, epochs=epochs, learning_rate=lr,
                                         weight_decay=wd, batch_size=batch, seed=7)
  init_key, key = jax.random.split(jax.random.PRNGKey(7))
  p = {k: np.asarray(v, np.float64) for k, v in evaluate._classifier_init(init_key, dim, classes).items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  t, rows_seen = 0, []
  for epoch in range(epochs):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    for idx in (order[:32], order[32:64], order[64:]):
      t += 1
      p = _numpy_adam_l2_step(p, _numpy_softmax_grads(p, x[idx].astype(np.float64), y[idx], classes),
                              m, v2, t, lr, wd)
      rows_seen.append(len(idx))
  assert rows_seen == [32, 32, 11] * epochs
  for k in p:
    np.testing.assert_allclose(np.asarray(got[k]), p[k], rtol=1e-4, atol=1e-6)


def test_wahba_trial_of_an_exact_rotation_is_zero_and_of_noise_is_not():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(64, 8))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  q[:, 0] *= np.sign(np.linalg.det(q))  # a proper rotation (det +1)
  exact = evaluate.wahba_trial(z, z @ q.T)
  assert exact["wahba_error"] < 1e-4 and exact["relative_equivariance"] < 1e-8
  other = rng.normal(size=(64, 8))
  noisy = evaluate.wahba_trial(z, other / np.linalg.norm(other, axis=1, keepdims=True))
  assert noisy["wahba_error"] > 1.0
  assert noisy["wahba_error"] == pytest.approx(float(geometry.wahba_error(z, other / np.linalg.norm(
      other, axis=1, keepdims=True))))
  assert exact["linear_fit_error"] < 1e-5 and exact["form_preservation_error"] < 1e-5
  assert noisy["linear_fit_error"] > 0.5
  summary = evaluate.summarize_trials([exact, noisy], 64)
  assert summary["wahba_error_max"] == noisy["wahba_error"]
  assert summary["wahba_error_mean"] == pytest.approx((exact["wahba_error"] + noisy["wahba_error"]) / 2)
  assert summary["linear_fit_error"] == pytest.approx((exact["linear_fit_error"] + noisy["linear_fit_error"]) / 2)


def test_linear_fit_error_is_the_residual_off_the_span_over_the_augmented_norm():
  # Closed form: z_aug = z A^T + E with E orthogonal to z's columns, so least
  # squares recovers A and leaves E: linear_fit_error = ||E||_F / ||z_aug||_F.
  # Rows not on the unit sphere, so ||z|| and ||z_aug|| differ.
  rng = np.random.default_rng(8)
  z = 3.0 * rng.normal(size=(50, 6))
  e = rng.normal(size=(50, 6))
  e -= z @ np.linalg.lstsq(z, e, rcond=None)[0]
  z_aug = z @ (0.5 * rng.normal(size=(6, 6))).T + e
  got = evaluate.wahba_trial(z, z_aug)
  assert got["linear_fit_error"] == pytest.approx(np.linalg.norm(e) / np.linalg.norm(z_aug), rel=1e-6)


def test_the_form_is_judged_on_the_span_the_embeddings_fill():
  # Embeddings in a 4-dimensional subspace of R^6 (a trained encoder's rank
  # deficiency), moved by a Lorentz boost that keeps the subspace: on the span the
  # map is in the group. Off it least squares fits the float noise, and judging the
  # whole 6 x 6 map would report a large form error.
  from tests.test_losses import _lorentz_boost
  rng = np.random.default_rng(9)
  boost = _lorentz_boost(6, rapidity=0.5)  # mixes coordinates 0 and 1 only
  z = np.zeros((64, 6))
  z[:, :4] = rng.normal(size=(64, 4))
  z += 1e-9 * rng.normal(size=z.shape)  # the off-span directions: noise
  z_aug = z @ boost.T
  z_aug[:, 4:] = 1e-9 * rng.normal(size=(64, 2))  # unrelated noise there
  got = evaluate.wahba_trial(z, z_aug, "minkowski")
  assert got["span_rank"] == 4
  assert got["form_preservation_error"] < 1e-5 and got["linear_fit_error"] < 1e-6
  whole = np.asarray(geometry.fit_linear_map(z, z_aug))
  assert float(geometry.form_preservation_error(whole, np.asarray(evaluate.losses.bilinear_form("minkowski", 6)))) > 0.1


def test_colour_transforms_are_the_single_ops_they_name():
  # colour_sensitivity's transforms, through apply_augmentation (the chunked
  # path, a partial last chunk), against each op written out in NumPy on a
  # colourful image; the blur and the hue against augment_jax's own ops.
  from care_jax import augment_jax
  from care_jax.augment_config import augment_config
  rng = np.random.default_rng(10)
  images = (rng.integers(0, 256, (5, 16, 16, 3)) * rng.uniform(0.2, 1.0, (5, 1, 1, 3))).astype(np.uint8)
  aug = augment_config("cifar10", 16)
  mean, std = np.asarray(aug.mean), np.asarray(aug.std)
  unnormalise = lambda v: v * std + mean
  transforms = evaluate.colour_transforms(16, 16)
  views = {name: unnormalise(evaluate.apply_augmentation(images, params, aug, chunk=4))
           for group in transforms.values() for name, params in group.items()}
  x = images / 255.0
  identity = unnormalise(evaluate.apply_augmentation(images, evaluate.identity_augmentation(16, 16), aug, chunk=4))
  np.testing.assert_allclose(identity, x, atol=1e-5)
  np.testing.assert_allclose(views["flip"], x[:, :, ::-1], atol=1e-5)
  grey = x @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(views["grayscale"], np.repeat(grey[..., None], 3, axis=-1), atol=1e-5)
  # The centre half (rows and columns 4..11) resampled to 16 through its corner pixels
  # (crop_and_resize, antialias off): output s reads 4 + s * 7 / 15, bilinearly.
  at = 4 + np.arange(16) * 7 / 15
  lo, frac = np.floor(at).astype(int), at - np.floor(at)
  hi = np.minimum(lo + 1, 15)
  rows = x[:, lo] * (1 - frac)[None, :, None, None] + x[:, hi] * frac[None, :, None, None]
  centre = rows[:, :, lo] * (1 - frac)[None, None, :, None] + rows[:, :, hi] * frac[None, None, :, None]
  np.testing.assert_allclose(views["crop-centre-half"], centre, atol=1e-5)
  for name, delta in (("hue+0.1", 0.1), ("hue-0.1", -0.1)):
    want = np.asarray(augment_jax._adjust_hue(x.astype(np.float32), np.full(5, delta, np.float32)))
    np.testing.assert_allclose(views[name], want, atol=1e-5)
    assert np.abs(views[name] - x).mean() > 0.02, name  # it did shift the hue
  blur = augment_jax._blur_matrix(np.ones(5, np.float32), 16, aug.blur_kernel_size)
  want = np.asarray(augment_jax._separable(x.astype(np.float32), blur, blur))
  np.testing.assert_allclose(views["blur-sigma-1"], want, atol=1e-5)
  assert np.abs(views["blur-sigma-1"] - x).mean() > 0.02


def test_form_preservation_report_separates_the_groups():
  from tests.test_losses import _hyperboloid, _lorentz_boost, _symplectic_matrix
  rng = np.random.default_rng(4)
  z = _hyperboloid(rng, 64, 6)
  boost = _lorentz_boost(6, rapidity=0.5)
  lorentz = evaluate.wahba_trial(z, z @ boost.T, "minkowski")
  # One linear map explains it and it is in the Lorentz group, yet it is no rotation.
  assert lorentz["linear_fit_error"] < 1e-5 and lorentz["form_preservation_error"] < 1e-5
  assert evaluate.wahba_trial(z, z @ boost.T)["form_preservation_error"] > 0.05
  s = _symplectic_matrix(rng, 6)
  symplectic = evaluate.wahba_trial(z, z @ s.T, "symplectic")
  assert symplectic["linear_fit_error"] < 1e-5 and symplectic["form_preservation_error"] < 1e-5
  assert evaluate.wahba_trial(z, z @ s.T, "minkowski")["form_preservation_error"] > 0.05


def test_crc32c_known_answer():
  assert metric_writers.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value


def test_tensorboard_events_are_read_back_by_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  from tensorflow.core.util import event_pb2  # noqa: PLC0415

  writer = metric_writers.MetricWriter(tmp_path, total_steps=10)
  writer.write(3, {"loss": 1.25, "images_per_sec": 300.0, "finite": True})
  writer.write(7, {"loss": 0.5, "images_per_sec": 310.0, "finite": True})
  # Steps past one varint byte (128) and past 32 bits; a tag past 127 bytes.
  long_tag = "eval/" + "x" * 150
  writer.write(300, {"loss": 0.25})
  writer.write(2 ** 33 + 5, {long_tag: 2.0})
  writer.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  events = [event_pb2.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
  assert events[0].file_version == "brain.Event:2"
  assert all(abs(e.wall_time - time.time()) < 600 for e in events)  # the write's clock, in seconds
  scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  assert scalars == {(3, "loss"): 1.25, (3, "images_per_sec"): 300.0, (7, "loss"): 0.5,
                     (7, "images_per_sec"): 310.0, (300, "loss"): 0.25, (2 ** 33 + 5, long_tag): 2.0}
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[:2] == [{"step": 3, "loss": 1.25, "images_per_sec": 300.0, "finite": True},
                      {"step": 7, "loss": 0.5, "images_per_sec": 310.0, "finite": True}]
  writer.truncate_after(5)
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_not_fatal(tmp_path):
  from care_jax import plots
  writer = metric_writers.MetricWriter(tmp_path, total_steps=10)
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.5})
  writer.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "lo')  # the append a SIGKILL or a full disk interrupted
  assert plots.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  metric_writers.MetricWriter(tmp_path, total_steps=10).truncate_after(2)  # the resume: was a JSONDecodeError
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
  assert not list(tmp_path.glob("*.partial"))  # rewritten aside and renamed over the file


# ------------------------------------------------------------------ the release's augmented probe

def _smoke_model_and_variables(**overrides):
  from care_jax import config_lib, train
  config = config_lib.load_config_file(evaluate.config_lib.__file__.replace("care_jax/config_lib.py", "configs/quickstart.py"),
                                       "smoke")
  if str(overrides.get("dataset", "")).startswith("npz:"):
    # The preset's slices (train[:2048], test[:1024]) are Fashion-MNIST's; a small archive is read whole.
    config.eval_train_split, config.test_split = "train", "test"
  for k, v in overrides.items():
    config[k] = v
  model = train.build_model(config)
  variables = model.init(jax.random.PRNGKey(1), np.zeros((2, 16, 16, 3), np.float32), train=False)
  return config, model, variables


def test_augmented_probe_on_eight_devices_matches_a_plain_numpy_loop_and_moves_only_running_statistics():
  # The release's linear.py: each step augments its batch afresh, runs the frozen
  # backbone with BatchNorm in training mode (running statistics move, weights do
  # not) and takes an Adam + L2 step on the classifier. Reference: one device, no
  # jit or scan, the softmax gradient and Adam in NumPy.
  from jax.sharding import Mesh
  from care_jax import augment_jax
  from care_jax.augment_config import augment_config
  config, model, variables = _smoke_model_and_variables()
  rng = np.random.default_rng(0)
  n, classes, batch, epochs, lr, wd = 40, 4, 16, 2, 1e-2, 0.1  # steps of 16, 16 and 8 rows an epoch
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, classes, n)
  aug = augment_config("fashion_mnist", 16)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  assert mesh.size == 8
  clf, probed = evaluate.augmented_linear_probe(model, variables, images, labels, num_classes=classes, aug=aug,
                                                mesh=mesh, epochs=epochs, learning_rate=lr, weight_decay=wd,
                                                batch_size=batch, seed=3)
  init_key, key = jax.random.split(jax.random.PRNGKey(3))
  f_dim = clf["w"].shape[0]
  p = {k: np.asarray(v, np.float64) for k, v in evaluate._classifier_init(init_key, f_dim, classes).items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  stats, t = variables["batch_stats"], 0

  @jax.jit  # one batch: augment, then the backbone in training mode (on one device)
  def features(stats, x, view_key):
    views = augment_jax.apply(x, augment_jax.sample_params(view_key, len(x), 16, 16, aug), aug)
    f, moved = model.apply({**variables, "batch_stats": stats}, views, train=True, mutable=["batch_stats"],
                           method=lambda m, x, train: m.backbone(x, train))
    # The head's statistics stay: the release's probe runs the backbone (net.f) alone.
    return f, {**stats, "backbone": moved["batch_stats"]["backbone"]}

  rows_seen = []
  for epoch in range(epochs):
    order, keys, tail, tail_key = evaluate.augmented_probe_order(key, epoch, n, batch)
    for idx, view_key in [*zip(np.asarray(order), keys), (np.asarray(tail), tail_key)]:
      f, stats = features(stats, jax.device_put(images[idx], jax.devices()[0]), view_key)
      t += 1
      p = _numpy_adam_l2_step(p, _numpy_softmax_grads(p, np.asarray(f, np.float64), labels[idx], classes),
                              m, v2, t, lr, wd)
      rows_seen.append(len(idx))
  # The last partial batch is a step of its own (its own BatchNorm statistics), every
  # row once an epoch; none where it cannot be a BatchNorm batch.
  assert rows_seen == [16, 16, 8] * epochs
  assert sorted(np.concatenate([np.ravel(order), tail]).tolist()) == list(range(n))
  assert evaluate.augmented_probe_order(key, 0, 41, 16)[2] is not None  # 9 rows, one group
  assert evaluate.augmented_probe_order(key, 0, 41, 16, groups=2)[2] is None  # 9 rows do not halve
  assert evaluate.augmented_probe_order(key, 0, 33, 16)[2] is None  # one row: no batch statistics
  np.testing.assert_allclose(np.asarray(clf["w"]), p["w"], rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(np.asarray(clf["b"]), p["b"], rtol=2e-3, atol=2e-5)
  for got, want, before in zip(jax.tree.leaves(probed["batch_stats"]), jax.tree.leaves(stats),
                               jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(probed["batch_stats"]),
                                                   jax.tree.leaves(variables["batch_stats"])))
  assert probed["params"] is variables["params"]  # the encoder's weights are never trained


def test_an_augmented_probe_batch_larger_than_the_split_is_cut_to_whole_batchnorm_groups():
  # A small split and the default batch_size (512): one batch of the whole split a
  # step, cut to the largest multiple of bn_groups (10 rows, groups of 4 -> 8; the 2
  # left cannot be a group of their own and wait for the next epoch's permutation).
  from jax.sharding import Mesh
  from care_jax.augment_config import augment_config
  config, model, variables = _smoke_model_and_variables(bn_groups=4)
  assert model.backbone.bn_groups == 4
  rng = np.random.default_rng(4)
  images, labels = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 10)
  common = dict(num_classes=3, aug=augment_config("fashion_mnist", 16), mesh=Mesh(np.asarray(jax.devices()), ("data",)),
                epochs=2, learning_rate=1e-2, seed=1)
  whole, whole_vars = evaluate.augmented_linear_probe(model, variables, images, labels, **common)
  eight, eight_vars = evaluate.augmented_linear_probe(model, variables, images, labels, batch_size=8, **common)
  for a, b in zip(jax.tree.leaves((whole, whole_vars)), jax.tree.leaves((eight, eight_vars))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.isfinite(np.asarray(whole["w"])))


def test_probe_accuracy_is_brute_force_top1_and_top5():
  rng = np.random.default_rng(3)
  for classes in (10, 3):  # top-5 of 3 classes: every label
    dim, n = 6, 200
    classifier = {"w": rng.normal(size=(dim, classes)).astype(np.float32),
                  "b": rng.normal(size=classes).astype(np.float32)}
    x, y = rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n)
    logits = x.astype(np.float64) @ classifier["w"] + classifier["b"]
    rank_of_label = np.array([np.sum(row > row[label]) for row, label in zip(logits, y)])
    got = evaluate.probe_accuracy(classifier, x, y, classes)
    assert got["top1"] == pytest.approx(100 * np.mean(rank_of_label == 0))
    assert got["top5"] == pytest.approx(100 * np.mean(rank_of_label < 5))
    assert 0 < got["top1"] < got["top5"] <= 100


def test_the_evaluator_scores_the_augmented_probe_under_the_statistics_it_left(tmp_path):
  # source_image_size=32, image_size=16 (STL-10's 96 -> 32): the probe trains on crops
  # of the 32x32 originals and tests on the split resized to 16.
  from jax.sharding import Mesh
  rng = np.random.default_rng(1)
  path = tmp_path / "tiny.npz"
  images, labels = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 48)
  np.savez(path, images=images, labels=labels)
  config, model, variables = _smoke_model_and_variables(
      dataset=f"npz:{path}", source_image_size=32, linear_probe_protocol="augmented", linear_probe_epochs=2,
      linear_probe_batch_size=16, eval_batch_size=16)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  evaluator = evaluate.RunEvaluator(config, model, mesh, log=lambda _: None)
  got = evaluator.linear_probe(variables, "tag", seeds=2)
  assert got["protocol"] == "augmented" and got["seeds"] == [config.seed, config.seed + 1]
  test_images = evaluate.datasets.to_rgb_size(images, 16)
  for seed, top1 in zip(got["seeds"], got["top1_per_seed"]):
    clf, probed = evaluate.augmented_linear_probe(model, variables, images, labels, num_classes=3,
                                                  aug=evaluator.aug, mesh=mesh, epochs=2, batch_size=16, seed=seed)
    features = model.apply(probed, evaluate.datasets.normalized(test_images, evaluator.aug), train=False)[0]
    assert top1 == pytest.approx(evaluate.probe_accuracy(clf, features, labels, 3)["top1"])
  assert not evaluator._features  # nothing cached: the test features depend on the probe's statistics


def test_test_examples_also_in_the_train_split_are_counted_and_warned_about(tmp_path):
  # An npz of one set serves every split name: its 'test' split is the training images.
  from jax.sharding import Mesh
  rng = np.random.default_rng(3)
  images, labels = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 40)
  one, named = tmp_path / "one.npz", tmp_path / "named.npz"
  np.savez(one, images=images, labels=labels)
  np.savez(named, train_images=images[:30], train_labels=labels[:30], test_images=images[30:], test_labels=labels[30:])
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  for dataset, splits, shared in ((one, {}, 40), (one, dict(eval_train_split="train[:30]", test_split="test[25:]"), 5),
                                  (one, dict(eval_train_split="train[:75%]", test_split="test[75%:]"), 0),
                                  (named, {}, 0)):
    config, model, _ = _smoke_model_and_variables(dataset=f"npz:{dataset}", **splits)
    logs = []
    evaluator = evaluate.RunEvaluator(config, model, mesh, log=logs.append)
    evaluator.check_splits()
    assert evaluator.test_examples_in_train_split() == shared
    if shared:
      test_split = splits.get("test_split", config.test_split)
      assert logs == [f"warning: {shared} of the {len(evaluator.data(test_split).labels)} test_split={test_split!r} examples "
                      f"are also in the kNN bank / probe split {config.eval_train_split or config.train_split!r} of "
                      f"npz:{dataset}: the test accuracies are partly training accuracies; slice the source apart "
                      "(train[:90%], test[90%:]) or give it separate splits"]
    else:
      assert logs == []


def test_the_features_cache_on_disk_serves_only_the_weights_that_made_it_and_survives_damage(tmp_path, monkeypatch):
  from jax.sharding import Mesh
  rng = np.random.default_rng(2)
  path = tmp_path / "tiny.npz"
  np.savez(path, images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), labels=rng.integers(0, 3, 40))
  config, model, variables = _smoke_model_and_variables(dataset=f"npz:{path}", eval_batch_size=16)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  logs = []
  evaluator = lambda: evaluate.RunEvaluator(config, model, mesh, log=logs.append, cache_dir=tmp_path / "features")
  first = evaluator().features(variables, 7, "test")
  cache = tmp_path / "features" / "step_7" / "test-0.npz"
  assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no .partial left
  extract, extractions = evaluate.extract_features, []
  monkeypatch.setattr(evaluate, "extract_features", lambda *a: extractions.append(1) or extract(*a))

  again = evaluator().features(variables, 7, "test")  # a later evaluation of the same checkpoint
  assert extractions == [] and logs == [] and all(np.array_equal(a, b) for a, b in zip(first, again))
  # Other weights at the same step (the workdir trained again): extracted afresh, not the old features.
  other = jax.tree.map(lambda x: x * 1.5, variables)
  fresh = evaluator().features(other, 7, "test")
  e = evaluator()
  assert np.allclose(fresh[0], extract(e.embed_fn, other, e._batches("test", 0), e.to_global)[0])
  assert extractions == [1] and not np.allclose(fresh[0], first[0])
  assert logs == [f"features cache {cache} is made by other weights or settings; extracting them again"]
  # A truncated file (a run killed mid-write, before writes were atomic): extracted again and rewritten.
  evaluator().features(variables, 7, "test")
  cache.write_bytes(cache.read_bytes()[:100])
  logs.clear()
  assert np.allclose(evaluator().features(variables, 7, "test")[0], first[0])
  assert len(logs) == 1 and "is unreadable (" in logs[0]
  assert len(extractions) == 3 and np.allclose(np.load(cache)["features"], first[0])


# ------------------------------------------------------------------ MoCo's lincls probe (ImageNet-100)

def test_lincls_probe_on_eight_devices_is_numpy_sgd_on_frozen_features_short_batch_included(tmp_path):
  # main_lincls.py: crop + flip views every epoch through the backbone in inference
  # mode, SGD momentum 0.9 + L2, the rate x 0.1 at each drop epoch, every batch
  # (the short last one too) a step on its own mean loss, the best epoch reported.
  # Reference: one device, no jit or scan; softmax gradient and SGD in NumPy.
  from jax.sharding import Mesh
  from care_jax import augment_jax
  rng = np.random.default_rng(2)
  n, classes, batch, epochs, lr, wd, drops = 40, 4, 16, 3, 0.5, 0.01, (2,)  # steps of 16, 16 and 8 rows
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, classes, n)
  path = tmp_path / "tiny.npz"
  np.savez(path, images=images, labels=labels)
  config, model, variables = _smoke_model_and_variables(
      dataset=f"npz:{path}", linear_probe_protocol="lincls", linear_probe_epochs=epochs, linear_probe_lr=lr,
      linear_probe_weight_decay=wd, linear_probe_batch_size=batch, linear_probe_lr_drop_epochs=drops,
      eval_batch_size=16)
  before = jax.tree.map(np.array, variables)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  assert mesh.size == 8
  evaluator = evaluate.RunEvaluator(config, model, mesh, log=lambda _: None)
  test_f, _, test_y = evaluator.features(variables, "tag", config.test_split)
  got = evaluate.lincls_probe(model, variables, images=images, labels=labels, test_features=test_f,
                              test_labels=test_y, num_classes=classes, aug=evaluator.aug, mesh=mesh, epochs=epochs,
                              learning_rate=lr, weight_decay=wd, batch_size=batch, drop_epochs=drops, seed=5)
  # The evaluator's lincls: the same probe on its own splits, seeds from config.seed.
  report = evaluator.linear_probe(variables, "tag", seeds=1)
  direct = evaluate.lincls_probe(model, variables, images=images, labels=labels, test_features=test_f,
                                 test_labels=test_y, num_classes=classes, aug=evaluator.aug, mesh=mesh,
                                 epochs=epochs, learning_rate=lr, weight_decay=wd, batch_size=batch,
                                 drop_epochs=drops, seed=config.seed)
  assert report["protocol"] == "lincls" and report["top1"] == direct["top1"]
  assert report["top1_last_per_seed"] == [direct["top1_last"]] and report["lr_drop_epochs"] == list(drops)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(before)):  # nothing in the encoder moved
    np.testing.assert_array_equal(np.asarray(a), b)

  init_key, key = jax.random.split(jax.random.PRNGKey(5))
  p = {k: np.asarray(v, np.float64) for k, v in evaluate.lincls_classifier_init(init_key, test_f.shape[1],
                                                                               classes).items()}
  assert abs(np.std(p["w"]) - 0.01) < 0.002 and not p["b"].any()
  velocity = {k: np.zeros_like(v) for k, v in p.items()}

  @jax.jit  # one batch: crop + flip, the backbone in inference mode (on one device)
  def features(x, view_key):
    views = augment_jax.crop_flip(x, augment_jax.sample_params(view_key, batch, 16, 16, evaluator.aug),
                                  evaluator.aug)
    return model.apply(variables, views, train=False, method=lambda m, x, train: m.backbone(x, train))

  per_epoch, rows_seen = [], []
  for epoch in range(epochs):
    rate = lr * (0.1 if epoch >= 2 else 1.0)
    order, mask, keys = evaluate.lincls_probe_order(key, epoch, n, batch)
    for idx, m, view_key in zip(np.asarray(order), np.asarray(mask), keys):
      f = np.asarray(features(jax.device_put(images[idx], jax.devices()[0]), view_key), np.float64)
      for k, g in _numpy_softmax_grads(p, f, labels[idx], classes, mask=m).items():
        velocity[k] = 0.9 * velocity[k] + g + wd * p[k]
        p[k] = p[k] - rate * velocity[k]
      rows_seen.append(int(m.sum()))
    per_epoch.append(evaluate.probe_accuracy(p, test_f, test_y, classes)["top1"])
  assert rows_seen == [16, 16, 8] * epochs  # the short batch is a step of its own
  np.testing.assert_allclose(np.asarray(got["classifier"]["w"]), p["w"], rtol=2e-3, atol=2e-6)
  np.testing.assert_allclose(np.asarray(got["classifier"]["b"]), p["b"], rtol=2e-3, atol=2e-6)
  assert got["top1_per_epoch"] == pytest.approx(per_epoch)
  assert got["top1"] == max(per_epoch) and got["best_epoch"] == int(np.argmax(per_epoch))
  assert got["top1_last"] == pytest.approx(per_epoch[-1])


def test_summary_line_leaves_out_the_geometry_when_no_wahba_trial_ran():
  # wahba_trials=0 gives None for Wahba and gamma_f; the end-of-run line once crashed on it.
  report = {"knn_top1": 77.054, "linear_probe_top1": 78.77, "wahba_error_mean": None, "wahba_error_max": None,
            "relative_equivariance": None}
  assert evaluate.summary_line(report) == "kNN top-1 77.05%  linear probe top-1 78.77%"
  report.update(wahba_error_mean=16.03612, wahba_error_max=26.1366, relative_equivariance=0.83768)
  assert evaluate.summary_line(report) == ("kNN top-1 77.05%  linear probe top-1 78.77%  Wahba error mean 16.0361 "
                                           "max 26.1366  gamma_f 0.8377")
