"""Evaluations of a trained encoder: features, kNN, linear probe, Wahba reports.

Everything here is TensorFlow-free: batches arrive as NumPy dicts (images,
labels, mask) from the input pipeline, and the augmented views for the Wahba
report arrive as arrays.

  extract_features   whole split through the encoder, sharded over the mesh;
                     the `mask` of padded batches keeps every example exactly once
  knn_accuracy       weighted kNN (InstDisc / the release's monitor): cosine
                     similarities, top-k neighbours voting with exp(sim / T);
                     the bank is processed in query chunks so memory is bounded
  linear_probe       softmax regression on frozen features, Adam with L2 weight
                     decay (the release's protocol), top-1/top-5 on the test split
  wahba_trial        Wahba error and gamma_f of one augmentation applied to a set
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from care_jax import geometry


# ------------------------------------------------------------------ features

def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as a NumPy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def extract_features(embed_fn: Callable, variables, batches: Iterable[dict],
                     to_global: Callable[[np.ndarray], jax.Array]):
  """(features, projections, labels) for every real row of `batches`.

  embed_fn(variables, images) -> (features, projections); to_global turns a
  process-local NumPy batch into a global sharded array.
  """
  feats, projs, labels = [], [], []
  for batch in batches:
    f, z = embed_fn(variables, to_global(batch["images"]))
    mask = to_host(to_global(np.asarray(batch["mask"])))
    feats.append(to_host(f)[mask])
    projs.append(to_host(z)[mask])
    labels.append(to_host(to_global(np.asarray(batch["labels"], np.int32)))[mask])
  return np.concatenate(feats), np.concatenate(projs), np.concatenate(labels)


# ------------------------------------------------------------------ kNN

def _normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_scores(bank, bank_labels, queries, *, num_classes: int, k: int, temperature):
  sim = queries @ bank.T
  top_sim, top_idx = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * jnp.exp(top_sim / temperature)[..., None]
  return jnp.sum(votes, axis=1)


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 *, num_classes: int, k: int = 200, temperature: float = 0.5, chunk: int = 512) -> dict:
  """Weighted kNN top-1/top-5 (percent) of `queries` against a labelled feature bank."""
  k = min(k, len(bank))
  bank_n = _normalize(bank)
  bank_labels = jnp.asarray(bank_labels, jnp.int32)
  queries = np.asarray(queries, np.float32)
  correct1 = correct5 = 0
  for start in range(0, len(queries), chunk):
    q = queries[start:start + chunk]
    rows = len(q)
    if rows < chunk:  # Pad so every chunk has one shape (one compilation).
      q = np.concatenate([q, np.zeros((chunk - rows,) + q.shape[1:], q.dtype)])
    scores = np.asarray(_knn_scores(bank_n, bank_labels, _normalize(q), num_classes=num_classes, k=k,
                                    temperature=temperature))[:rows]
    labels = np.asarray(query_labels[start:start + rows])
    ranked = np.argsort(-scores, axis=1, kind="stable")
    correct1 += int(np.sum(ranked[:, 0] == labels))
    correct5 += int(np.sum(np.any(ranked[:, :min(5, num_classes)] == labels[:, None], axis=1)))
  n = len(queries)
  return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "k": k, "temperature": temperature}


# ------------------------------------------------------------------ linear probe

def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 num_classes: int, epochs: int = 100, learning_rate: float = 1e-3,
                 weight_decay: float = 1e-6, batch_size: int = 512, seed: int = 0) -> dict:
  """Softmax regression on frozen features; returns test top-1/top-5 (percent).

  Adam with L2 weight decay added to the gradient (torch.optim.Adam's
  weight_decay, as the release). Each epoch is a fresh permutation cut into
  full batches; the < batch_size remainder changes every epoch.
  """
  train_x = jnp.asarray(train_x, jnp.float32)
  train_y = jnp.asarray(train_y, jnp.int32)
  n, dim = train_x.shape
  batch_size = min(batch_size, n)
  steps = n // batch_size
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
  init_key, key = jax.random.split(jax.random.PRNGKey(seed))
  # torch.nn.Linear's default init, so a short probe starts where the release's does.
  bound = 1.0 / np.sqrt(dim)
  params = {"w": jax.random.uniform(init_key, (dim, num_classes), jnp.float32, -bound, bound),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p, x, y):
    logits = x @ p["w"] + p["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  @jax.jit
  def run(p, opt_state):
    def epoch(carry, e):
      p, opt_state = carry
      order = jax.random.permutation(jax.random.fold_in(key, e), n)[:steps * batch_size].reshape(steps, -1)

      def step(carry, idx):
        p, opt_state = carry
        grads = jax.grad(loss_fn)(p, train_x[idx], train_y[idx])
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

      return jax.lax.scan(step, (p, opt_state), order)[0], None

    return jax.lax.scan(epoch, (p, opt_state), jnp.arange(epochs))[0]

  params, _ = run(params, tx.init(params))
  logits = np.asarray(jnp.asarray(test_x, jnp.float32) @ params["w"] + params["b"])
  ranked = np.argsort(-logits, axis=1, kind="stable")
  test_y = np.asarray(test_y)
  return {"top1": 100.0 * float(np.mean(ranked[:, 0] == test_y)),
          "top5": 100.0 * float(np.mean(np.any(ranked[:, :min(5, num_classes)] == test_y[:, None], axis=1))),
          "epochs": epochs, "seed": seed}


# ------------------------------------------------------------------ geometry

def wahba_trial(z: np.ndarray, z_aug: np.ndarray) -> dict:
  """One augmentation applied to every row: Wahba error and gamma_f of the embeddings."""
  return {"wahba_error": float(geometry.wahba_error(z, z_aug)),
          "relative_equivariance": float(geometry.relative_equivariance(z, z_aug))}


def summarize_trials(trials: list, n: int) -> dict:
  errors = np.array([t["wahba_error"] for t in trials])
  gammas = np.array([t["relative_equivariance"] for t in trials])
  return {"wahba_error_mean": float(errors.mean()), "wahba_error_max": float(errors.max()),
          "relative_equivariance": float(gammas.mean()), "wahba_examples": n, "wahba_trials": trials}


__all__ = ["extract_features", "knn_accuracy", "linear_probe", "wahba_trial", "summarize_trials", "to_host"]
