"""Evaluators and writers against independent truth."""

import json

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
  writer.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  events = [event_pb2.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
  assert events[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  assert scalars == {(3, "loss"): 1.25, (3, "images_per_sec"): 300.0, (7, "loss"): 0.5,
                     (7, "images_per_sec"): 310.0}
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 3, "loss": 1.25, "images_per_sec": 300.0, "finite": True},
                  {"step": 7, "loss": 0.5, "images_per_sec": 310.0, "finite": True}]
  writer.truncate_after(5)
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]
