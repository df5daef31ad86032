"""Evaluations of a trained encoder: features, kNN, linear probe, Wahba reports.

Everything here is TensorFlow-free: batches arrive as NumPy dicts (images,
labels, mask) from care_jax/datasets.py, and the Wahba, composition and colour
reports augment with the jnp backend (care_jax/augment_jax.py), so a run
on the device backend is evaluated without TensorFlow too.

  extract_features   whole split through the encoder, sharded over the mesh;
                     the `mask` of padded batches keeps every example exactly once
  knn_accuracy       weighted kNN (InstDisc / the release's monitor): cosine
                     similarities, top-k neighbours voting with exp(sim / T);
                     queries and the bank are both processed in chunks (a running
                     top-k per query), so device memory is bounded for any bank
  linear_probe       softmax regression on frozen features, Adam with L2 weight
                     decay (the release's optimiser), top-1/top-5 on the test split
  augmented_linear_probe  the release's CIFAR/STL probe: the classifier trained on
                     augmented images through the frozen backbone, BatchNorm in
                     training mode (its statistics move), then the test pass
  wahba_trial        Wahba error and gamma_f of one augmentation applied to a set
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Callable, Iterable, Optional

if __name__ == "__main__":  # the CLI: before jaxlib loads, as care_jax/main.py says why
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import optax

from care_jax import augment_jax, config_lib, datasets, geometry, losses, metric_writers, random_util
from care_jax import augment_config


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
  process-local NumPy batch into a global sharded array. A batch with no real
  row on any process ends the extraction (how uneven streamed parts stop together).
  """
  feats, projs, labels = [], [], []
  for batch in batches:
    mask = to_host(to_global(np.asarray(batch["mask"])))
    if not mask.any():  # padding on every process: a stream's end (streaming_eval_batches)
      break
    f, z = embed_fn(variables, to_global(batch["images"]))
    feats.append(to_host(f)[mask])
    projs.append(to_host(z)[mask])
    labels.append(to_host(to_global(np.asarray(batch["labels"], np.int32)))[mask])
  return np.concatenate(feats), np.concatenate(projs), np.concatenate(labels)


# ------------------------------------------------------------------ kNN

def _normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(0, 1))
def _merge_top_k(top_sim, top_labels, queries, block, block_labels, block_rows, *, k: int):
  """The running top-k (similarity, label) of each query, updated with one bank block.

  Rows of `block` at or past block_rows are padding and never enter the top k.
  """
  sim = queries @ block.T
  sim = jnp.where(jnp.arange(block.shape[0])[None, :] < block_rows, sim, -jnp.inf)
  # The block's own top k first, then a merge of two k-lists: concatenating the
  # running list onto the whole [queries, block] matrix cost 2x on XLA:CPU.
  block_sim, block_idx = jax.lax.top_k(sim, min(k, block.shape[0]))
  cand_sim = jnp.concatenate([top_sim, block_sim], axis=1)
  cand_labels = jnp.concatenate([top_labels, block_labels[block_idx]], axis=1)
  top_sim, idx = jax.lax.top_k(cand_sim, k)
  return top_sim, jnp.take_along_axis(cand_labels, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _knn_votes(top_sim, top_labels, *, num_classes: int, temperature):
  weights = jnp.exp(top_sim / temperature)  # exp(-inf) = 0 for slots a short bank never filled
  return jnp.sum(jax.nn.one_hot(top_labels, num_classes) * weights[..., None], axis=1)


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
  """x with zero rows appended up to `rows`, so every chunk has one shape (one compilation)."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *, num_classes: int,
               k: int = 200, temperature: float = 0.5, chunk: int = 512, bank_chunk: int = 65536) -> np.ndarray:
  """[queries, classes] weighted-kNN votes: sum of exp(cos / T) over each query's k nearest bank rows.

  The bank stays on the host and visits the device one block of bank_chunk rows
  at a time; each query chunk keeps a running top-k that every block updates,
  so device memory is O(bank_chunk * (F + chunk) + queries * k) whatever the
  bank's size (ImageNet's 1.28M x 2048 float32 bank is 10 GB; a 65536-row
  block is 512 MB). Ties between equal similarities may pick different
  neighbours than one global top_k would.
  """
  k = min(k, len(bank))
  queries = np.asarray(queries, np.float32)
  query_chunks = [_normalize(_padded(queries[s:s + chunk], chunk)) for s in range(0, len(queries), chunk)]
  state = [(jnp.full((chunk, k), -jnp.inf, jnp.float32), jnp.zeros((chunk, k), jnp.int32)) for _ in query_chunks]
  block_size = min(bank_chunk, len(bank))
  for start in range(0, len(bank), block_size):
    rows = min(block_size, len(bank) - start)
    block = _normalize(_padded(np.asarray(bank[start:start + rows], np.float32), block_size))
    block_labels = jnp.asarray(_padded(np.asarray(bank_labels[start:start + rows], np.int32), block_size))
    state = [_merge_top_k(*st, q, block, block_labels, rows, k=k) for st, q in zip(state, query_chunks)]
  scores = [np.asarray(_knn_votes(*st, num_classes=num_classes, temperature=temperature)) for st in state]
  return np.concatenate(scores)[:len(queries)]


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 *, num_classes: int, k: int = 200, temperature: float = 0.5, chunk: int = 512,
                 bank_chunk: int = 65536) -> dict:
  """Weighted kNN top-1/top-5 (percent) of `queries` against a labelled feature bank (see knn_scores)."""
  scores = knn_scores(bank, bank_labels, queries, num_classes=num_classes, k=k, temperature=temperature,
                      chunk=chunk, bank_chunk=bank_chunk)
  labels = np.asarray(query_labels)
  ranked = np.argsort(-scores, axis=1, kind="stable")
  n = len(queries)
  top1 = np.sum(ranked[:, 0] == labels)
  top5 = np.sum(np.any(ranked[:, :min(5, num_classes)] == labels[:, None], axis=1))
  return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "k": min(k, len(bank)),
          "temperature": temperature, "bank_size": len(bank), "num_queries": n}


# ------------------------------------------------------------------ linear probe

def _classifier_init(key, dim: int, num_classes: int) -> dict:
  # torch.nn.Linear's default init, weights and bias both U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  # so a short probe starts where the release's nn.Linear does.
  bound = 1.0 / np.sqrt(dim)
  w_key, b_key = jax.random.split(key)
  return {"w": random_util.drawn_flat(jax.random.uniform, w_key, (dim, num_classes), dtype=jnp.float32,
                                      minval=-bound, maxval=bound),
          "b": jax.random.uniform(b_key, (num_classes,), jnp.float32, minval=-bound, maxval=bound)}


def _classifier_loss(p, x, y, mask=None):
  """Mean softmax cross-entropy of the linear classifier, over the rows of `mask` where given."""
  ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)
  if mask is None:
    return jnp.mean(ce)
  return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _probe_optimizer(learning_rate: float, weight_decay: float):
  # L2 weight decay added to the gradient: torch.optim.Adam's weight_decay, as the release.
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def probe_accuracy(classifier: dict, test_x: np.ndarray, test_y: np.ndarray, num_classes: int) -> dict:
  """Top-1 / top-5 (percent) of the linear classifier on test features."""
  logits = np.asarray(jnp.asarray(test_x, jnp.float32) @ classifier["w"] + classifier["b"])
  ranked = np.argsort(-logits, axis=1, kind="stable")
  test_y = np.asarray(test_y)
  return {"top1": 100.0 * float(np.mean(ranked[:, 0] == test_y)),
          "top5": 100.0 * float(np.mean(np.any(ranked[:, :min(5, num_classes)] == test_y[:, None], axis=1)))}


def train_linear_classifier(train_x: np.ndarray, train_y: np.ndarray, *, num_classes: int, epochs: int = 100,
                            learning_rate: float = 1e-3, weight_decay: float = 1e-6, batch_size: int = 512,
                            seed: int = 0) -> dict:
  """Softmax regression on frozen features -> the classifier {w, b}.

  Adam with L2 weight decay added to the gradient (torch.optim.Adam's
  weight_decay, as the release). Each epoch is a fresh permutation cut into
  batches, the last partial one a step of its own (a DataLoader without
  drop_last), so every row is seen every epoch.
  """
  train_x = jnp.asarray(train_x, jnp.float32)
  train_y = jnp.asarray(train_y, jnp.int32)
  n, dim = train_x.shape
  batch_size = min(batch_size, n)
  steps = n // batch_size
  tx = _probe_optimizer(learning_rate, weight_decay)
  init_key, key = jax.random.split(jax.random.PRNGKey(seed))
  params = _classifier_init(init_key, dim, num_classes)

  def step(carry, idx):
    p, opt_state = carry
    grads = jax.grad(_classifier_loss)(p, train_x[idx], train_y[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  @jax.jit
  def run(p, opt_state):
    def epoch(carry, e):
      order = jax.random.permutation(jax.random.fold_in(key, e), n)
      carry = jax.lax.scan(step, carry, order[:steps * batch_size].reshape(steps, -1))[0]
      if steps * batch_size < n:  # static: the partial batch's size is known when tracing
        carry = step(carry, order[steps * batch_size:])[0]
      return carry, None

    return jax.lax.scan(epoch, (p, opt_state), jnp.arange(epochs))[0]

  return run(params, tx.init(params))[0]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 num_classes: int, epochs: int = 100, learning_rate: float = 1e-3,
                 weight_decay: float = 1e-6, batch_size: int = 512, seed: int = 0) -> dict:
  """train_linear_classifier on the train features; returns test top-1/top-5 (percent)."""
  classifier = train_linear_classifier(train_x, train_y, num_classes=num_classes, epochs=epochs,
                                       learning_rate=learning_rate, weight_decay=weight_decay,
                                       batch_size=batch_size, seed=seed)
  return {**probe_accuracy(classifier, test_x, test_y, num_classes), "epochs": epochs, "seed": seed}


def _epoch_draws(key, epoch: int, n: int):
  """An augmenting probe's epoch: its row permutation, and the key its batches'
  augmentation keys come from."""
  return jax.random.permutation(jax.random.fold_in(key, 2 * epoch), n), jax.random.fold_in(key, 2 * epoch + 1)


def augmented_probe_order(key, epoch: int, n: int, batch_size: int, groups: int = 1):
  """Epoch `epoch`'s batches: (row indices [steps, batch_size], one augmentation key per
  batch, the last partial batch's rows, its key). The partial batch is None where it
  cannot be a training-mode BatchNorm batch: fewer than 2 rows per group, or rows that
  do not split evenly over the `groups` (torch would fail, or split it unevenly)."""
  steps = n // batch_size
  permutation, keys_key = _epoch_draws(key, epoch, n)
  rest = n - steps * batch_size
  tail = None
  if rest % groups == 0 and rest // groups >= 2:
    tail = permutation[steps * batch_size:], jax.random.fold_in(keys_key, steps)
  return (permutation[:steps * batch_size].reshape(steps, batch_size), jax.random.split(keys_key, steps),
          *(tail or (None, None)))


def backbone_features(model, images, train: bool):
  """ContrastiveModel.apply(..., method=backbone_features): the backbone alone, as the
  release's probe runs `net.f` (the projection head and its statistics stay out)."""
  return model.backbone(images, train)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("model", "aug", "batch_size", "learning_rate", "weight_decay", "rows"))
def _augmented_probe_epoch(carry, epoch, key, images, labels, params, *, model, aug, batch_size: int,
                           learning_rate: float, weight_decay: float, rows):
  """One epoch of augmented_linear_probe; carry = (classifier, optimiser state, batch_stats).
  Module-level and keyed on its static arguments: every seed, and the random-init
  baseline, reuse one compiled program."""
  n, height, width = images.shape[:3]
  tx = _probe_optimizer(learning_rate, weight_decay)

  def step(carry, batch):
    classifier, opt_state, batch_stats = carry
    idx, view_key = batch
    x = jax.lax.with_sharding_constraint(jnp.take(images, idx, axis=0), rows)
    views = augment_jax.apply(x, augment_jax.sample_params(view_key, idx.shape[0], height, width, aug), aug)
    features, moved = model.apply({"params": params, "batch_stats": batch_stats}, views, train=True,
                                  mutable=["batch_stats"], method=backbone_features)
    grads = jax.grad(_classifier_loss)(classifier, jax.lax.stop_gradient(features.astype(jnp.float32)),
                                       labels[idx])
    updates, opt_state = tx.update(grads, opt_state, classifier)
    return (optax.apply_updates(classifier, updates), opt_state, moved["batch_stats"]), None

  order, keys, tail, tail_key = augmented_probe_order(key, epoch, n, batch_size, model.backbone.bn_groups)
  carry = jax.lax.scan(step, carry, (order, keys))[0]
  # The last partial batch: a step of its own, its BatchNorm statistics over its own rows,
  # as the release's DataLoader (drop_last off) gives it.
  return carry if tail is None else step(carry, (tail, tail_key))[0]


def augmented_linear_probe(model, variables, images: np.ndarray, labels: np.ndarray, *, num_classes: int, aug,
                           mesh, epochs: int = 100, learning_rate: float = 1e-3, weight_decay: float = 1e-6,
                           batch_size: int = 512, seed: int = 0):
  """The release's CIFAR/STL probe (its linear.py): (classifier, variables after the probe).

  Softmax regression on the frozen backbone's features of SimCLR-augmented
  training images, augmented afresh every epoch (augment_jax, per image), with
  the backbone's BatchNorm in training mode: batch statistics normalise each
  batch and the running statistics move (the release calls net.train() on the
  frozen encoder). The test pass then embeds the test split in inference mode
  with the returned variables, whose running statistics the probe moved.
  Adam with L2 weight decay as `train_linear_classifier`. Each epoch's last partial batch is
  a step of its own, as the release's DataLoader keeps it (augmented_probe_order
  says when it cannot be).
  The training images stay on the devices (replicated, as DeviceFeed); each
  step's batch is gathered there and sharded along 'data'.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415
  n, height, width = images.shape[:3]
  replicated = NamedSharding(mesh, P())
  images = jax.device_put(np.asarray(images, np.uint8), replicated)
  labels = jax.device_put(np.asarray(labels, np.int32), replicated)
  features_shape = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, height, width, 3)), train=False,
                                                        method=backbone_features), variables)
  init_key, key = jax.random.split(jax.random.PRNGKey(seed))
  classifier = _classifier_init(init_key, features_shape.shape[-1], num_classes)
  groups = model.backbone.bn_groups  # full groups: a batch of the whole (small) split may not divide
  static = dict(model=model, aug=aug, batch_size=min(batch_size, n // groups * groups),
                learning_rate=float(learning_rate),
                weight_decay=float(weight_decay), rows=NamedSharding(mesh, P("data")))
  # A copy of the statistics: the epochs donate their carry, and the caller's
  # variables (the training state's) must outlive the probe.
  carry = (classifier, _probe_optimizer(learning_rate, weight_decay).init(classifier),
           jax.tree.map(jnp.copy, variables["batch_stats"]))
  for epoch in range(epochs):
    carry = _augmented_probe_epoch(carry, epoch, key, images, labels, variables["params"], **static)
  classifier, _, batch_stats = carry
  return classifier, {**variables, "batch_stats": batch_stats}


# ------------------------------------------------------------------ MoCo's lincls probe

LINCLS_MOMENTUM = 0.9


def lincls_classifier_init(key, dim: int, num_classes: int) -> dict:
  """main_lincls.py's fc: weights N(0, 0.01^2), bias 0."""
  return {"w": 0.01 * random_util.drawn_flat(jax.random.normal, key, (dim, num_classes), dtype=jnp.float32),
          "b": jnp.zeros((num_classes,), jnp.float32)}


def lincls_learning_rate(base: float, epoch: int, drop_epochs) -> float:
  """main_lincls.py's step schedule: base x 0.1 for every drop epoch reached."""
  return base * 0.1 ** sum(epoch >= d for d in drop_epochs)


def _lincls_update(carry, features, labels, mask, learning_rate, weight_decay: float):
  """One torch.optim.SGD step (L2 added to the gradient, momentum LINCLS_MOMENTUM, no
  dampening) on the mean loss over the batch's real rows: a short last batch (mask)
  counts as itself, as the release's DataLoader keeps it."""
  classifier, velocity = carry
  grads = jax.grad(_classifier_loss)(classifier, features, labels, mask)
  velocity = jax.tree.map(lambda v, g, p: LINCLS_MOMENTUM * v + g + weight_decay * p, velocity, grads, classifier)
  return jax.tree.map(lambda p, v: p - learning_rate * v, classifier, velocity), velocity


def _frozen_features(model, variables, views):
  # BatchNorm in inference mode (main_lincls.py's model.eval()): nothing in variables moves.
  features = model.apply(variables, views, train=False, method=backbone_features)
  return jax.lax.stop_gradient(features.astype(jnp.float32))


def lincls_probe_order(key, epoch: int, n: int, batch_size: int):
  """Epoch `epoch`'s batches for lincls_probe: row indices [steps, batch_size] of a fresh
  permutation, the last batch padded, its mask, and one augmentation key per batch."""
  steps = -(-n // batch_size)
  permutation, keys_key = _epoch_draws(key, epoch, n)
  order = jnp.concatenate([permutation, jnp.zeros((steps * batch_size - n,), permutation.dtype)])
  mask = jnp.arange(steps * batch_size) < n
  return order.reshape(steps, batch_size), mask.reshape(steps, batch_size), jax.random.split(keys_key, steps)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("model", "aug", "batch_size", "weight_decay", "rows"))
def _lincls_epoch(carry, epoch, key, learning_rate, images, labels, variables, *, model, aug, batch_size: int,
                  weight_decay: float, rows):
  """One epoch of lincls_probe on images held on the devices; carry = (classifier, velocity)."""
  n, height, width = images.shape[:3]

  def step(carry, batch):
    idx, mask, view_key = batch
    x = jax.lax.with_sharding_constraint(jnp.take(images, idx, axis=0), rows)
    views = augment_jax.crop_flip(x, augment_jax.sample_params(view_key, batch_size, height, width, aug), aug)
    features = _frozen_features(model, variables, views)
    return _lincls_update(carry, features, labels[idx], mask, learning_rate, weight_decay), None

  return jax.lax.scan(step, carry, lincls_probe_order(key, epoch, n, batch_size))[0]


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("model", "weight_decay"))
def _lincls_step(carry, variables, views, labels, mask, learning_rate, *, model, weight_decay: float):
  """One lincls_probe step on a streamed batch of (already augmented, normalised) views."""
  return _lincls_update(carry, _frozen_features(model, variables, views), labels, mask, learning_rate,
                        weight_decay)


def lincls_probe(model, variables, train_batches: Callable[[int], Iterable[dict]] | None = None, *,
                 test_features: np.ndarray, test_labels: np.ndarray, num_classes: int, mesh,
                 aug, images: np.ndarray | None = None, labels: np.ndarray | None = None,
                 to_global: Callable | None = None, epochs: int = 100, learning_rate: float = 30.0,
                 weight_decay: float = 1e-4, batch_size: int = 512, drop_epochs=(60, 80), seed: int = 0) -> dict:
  """MoCo's main_lincls.py, the release's ImageNet-100 probe: {top1 (the best epoch's, as
  the release reports), top5 (that epoch's), top1_last, best_epoch, top1_per_epoch, classifier}.

  A linear classifier (weights N(0, 0.01^2)) on the frozen backbone with BatchNorm in
  inference mode, trained on RandomResizedCrop + flip views drawn afresh every epoch;
  SGD momentum 0.9 with L2 weight decay, learning rate x 0.1 at each of drop_epochs;
  every batch counts, the short last one too. Since nothing in the backbone moves, the
  test features (the frozen encoder's, the kNN's) are computed once by the caller and
  scored after every epoch, as the release validates every epoch.
  The training views come from `images` / `labels` in memory (held on the devices,
  augmented there with augment_jax under `aug`; the rows sharded along 'data'), or
  from train_batches(epoch): process-local batches {images, labels, mask} of
  normalised views (input_pipeline.streaming_lincls_batches), turned global by
  to_global; a batch with no real row on any process ends the epoch.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415
  replicated = NamedSharding(mesh, P())
  height = width = aug.image_size  # the streamed views'
  if images is not None:
    height, width = images.shape[1:3]
    images = jax.device_put(np.asarray(images, np.uint8), replicated)
    labels = jax.device_put(np.asarray(labels, np.int32), replicated)
  dim = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, height, width, 3)), train=False,
                                             method=backbone_features), variables).shape[-1]
  init_key, key = jax.random.split(jax.random.PRNGKey(seed))
  classifier = lincls_classifier_init(init_key, dim, num_classes)
  carry = (classifier, jax.tree.map(jnp.zeros_like, classifier))
  weight_decay = float(weight_decay)
  per_epoch = []
  for epoch in range(epochs):
    lr = jnp.float32(lincls_learning_rate(learning_rate, epoch, drop_epochs))
    if images is not None:
      carry = _lincls_epoch(carry, epoch, key, lr, images, labels, variables, model=model, aug=aug,
                            batch_size=batch_size, weight_decay=weight_decay,
                            rows=NamedSharding(mesh, P("data")))
    else:
      for batch in train_batches(epoch):
        mask = to_global(np.asarray(batch["mask"]))
        if not to_host(mask).any():  # padding on every process: the stream's end
          break
        carry = _lincls_step(carry, variables, to_global(batch["images"]),
                             to_global(np.asarray(batch["labels"], np.int32)), mask, lr, model=model,
                             weight_decay=weight_decay)
    per_epoch.append(probe_accuracy(carry[0], test_features, test_labels, num_classes))
  best = int(np.argmax([r["top1"] for r in per_epoch]))  # the first of equals, as the release's '>'
  return {"top1": per_epoch[best]["top1"], "top5": per_epoch[best]["top5"], "top1_last": per_epoch[-1]["top1"],
          "best_epoch": best, "top1_per_epoch": [r["top1"] for r in per_epoch], "classifier": carry[0],
          "seed": seed}


# ------------------------------------------------------------------ geometry

def wahba_trial(z: np.ndarray, z_aug: np.ndarray, form=None) -> dict:
  """One augmentation applied to every row: how well one map explains it.

  wahba_error and relative_equivariance (gamma_f) ask for a rotation. For any
  geometry, also the unconstrained least-squares map A (z A^T ~ z_aug):
  linear_fit_error = ||z A^T - z_aug||_F / ||z_aug||_F (does ONE linear map
  explain the augmentation?) and form_preservation_error(A, J) (is that map in
  the geometry's group: J = I rotations, Minkowski Lorentz, symplectic Sp)?
  """
  z, z_aug = np.asarray(z, np.float64), np.asarray(z_aug, np.float64)
  a = np.asarray(geometry.fit_linear_map(z, z_aug))
  fit = np.linalg.norm(z @ a.T - z_aug) / np.linalg.norm(z_aug)
  j = losses.bilinear_form(form, z.shape[1])
  j = np.eye(z.shape[1]) if j is None else np.asarray(j, np.float64)
  # Trained embeddings fill only part of R^D; off that span least squares is
  # unconstrained and A's entries there are noise (form errors in the
  # hundreds). So the form is judged on the span: U = the right singular
  # vectors holding 99.9% of z's energy, A_U fitted between the projections,
  # against the form restricted to the span, U^T J U.
  _, sing, vt = np.linalg.svd(z, full_matrices=False)
  rank = int(np.searchsorted(np.cumsum(sing ** 2) / np.sum(sing ** 2), 0.999) + 1)
  u = vt[:rank].T
  a_u = np.asarray(geometry.fit_linear_map(z @ u, z_aug @ u))
  return {"wahba_error": float(geometry.wahba_error(z, z_aug)),
          "relative_equivariance": float(geometry.relative_equivariance(z, z_aug)),
          "linear_fit_error": float(fit), "span_rank": rank,
          "form_preservation_error": float(geometry.form_preservation_error(a_u, u.T @ j @ u))}


def summarize_trials(trials: list, n: int) -> dict:
  mean = lambda key: float(np.mean([t[key] for t in trials]))
  return {"wahba_error_mean": mean("wahba_error"), "wahba_error_max": float(max(t["wahba_error"] for t in trials)),
          "relative_equivariance": mean("relative_equivariance"), "linear_fit_error": mean("linear_fit_error"),
          "form_preservation_error": mean("form_preservation_error"), "wahba_examples": n, "wahba_trials": trials}


__all__ = ["extract_features", "knn_accuracy", "linear_probe", "augmented_linear_probe", "probe_accuracy",
           "wahba_trial", "summarize_trials", "to_host"]


# ------------------------------------------------------------------ a run's report

def one_augmentation(seed: int, trial: int, height: int, width: int, aug) -> dict:
  """The parameters of ONE augmentation drawn from (seed, trial), as Python values (for report.json)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), trial)
  params = augment_jax.sample_params(key, 1, height, width, aug)
  return {k: np.asarray(v)[0].tolist() for k, v in params.items()}


def identity_augmentation(height: int, width: int) -> dict:
  """Parameters that change nothing (override fields to get one transform alone)."""
  return {"crop": [0.0, 0.0, float(height), float(width)], "flip": False, "jitter": False, "brightness": 1.0,
          "contrast": 1.0, "saturation": 1.0, "jitter_order": [0, 1, 2, 3], "hue": 0.0, "grayscale": False,
          "blur": False, "blur_sigma": 1.0}


def colour_transforms(height: int, width: int) -> dict:
  """Single transforms for the colour-sensitivity measure: colour ones and geometric/blur ones."""
  base = identity_augmentation(height, width)
  h, w = float(height), float(width)
  return {
      "colour": {"hue+0.1": {**base, "jitter": True, "hue": 0.1}, "hue-0.1": {**base, "jitter": True, "hue": -0.1},
                 "grayscale": {**base, "grayscale": True}},
      "other": {"crop-centre-half": {**base, "crop": [h / 4, w / 4, h / 2, w / 2]}, "flip": {**base, "flip": True},
                "blur-sigma-1": {**base, "blur": True, "blur_sigma": 1.0}},
  }


@functools.partial(jax.jit, static_argnums=2)
def _augment(images, params, aug):
  return augment_jax.apply(images, params, aug)


def apply_augmentation(images: np.ndarray, params: dict, aug, chunk: int = 256) -> np.ndarray:
  """One augmentation (Python-valued params) applied to every uint8 image -> normalised float32.

  In fixed-size chunks (the last one padded), so every call reuses one compiled program.
  """
  batched = {}
  for name, value in params.items():
    value = np.asarray([value])
    value = value.astype({"f": np.float32, "i": np.int32}.get(value.dtype.kind, value.dtype))
    batched[name] = np.repeat(value, chunk, axis=0)
  return _map_padded(lambda part: _augment(part, batched, aug), images, chunk)


def _map_padded(fn, array: np.ndarray, size: int) -> np.ndarray:
  """fn over row chunks of `size` (the last one zero-padded: one shape, one compilation), trimmed."""
  out = []
  for start in range(0, len(array), size):
    part = array[start:start + size]
    rows = len(part)
    if rows < size:
      part = np.concatenate([part, np.zeros((size - rows,) + part.shape[1:], part.dtype)])
    out.append(np.asarray(fn(part))[:rows])
  return np.concatenate(out)


@jax.jit
def _leaf_sums(leaves):
  return [jnp.stack([jnp.sum(x), jnp.sum(x * x)]) for x in leaves]


class RunEvaluator:
  """Evaluates a model's variables on the config's splits (process-sharded, masked).

  Features are cached per (tag, split) in memory, so the kNN monitor, the probe
  and the baseline reuse one extraction per checkpoint; with `cache_dir`, those
  of a checkpoint step are also kept on disk (cache_dir/step_<N>/<split>.npz),
  so a later `python -m care_jax.evaluate` of the same checkpoint skips them. A
  file there is used only for the weights and preprocessing that made it, and a
  damaged one is extracted again (_cache_key, _read_cache).
  """

  def __init__(self, config, model, mesh, log: Callable[[str], None] = print, cache_dir=None):
    from care_jax import train  # noqa: PLC0415 (train imports us)
    self.config = config
    self.log = log
    self.model, self.mesh = model, mesh
    self.embed_fn = train.make_embed_fn(model, mesh)
    self.to_global = train.global_batch_builder(mesh)
    self.aug = augment_config.from_config(config)
    self._data, self._features = {}, {}
    self._cache_dir = cache_dir

  @property
  def streaming(self) -> bool:
    """Splits too large for memory (ImageNet): features are extracted from a tf.data stream."""
    return self.config.dataset in config_lib.STREAMING_DATASETS

  def data(self, split: str, size: int = 0):
    """A whole split in memory at side `size` (default image_size; not for streaming
    datasets: see _batches and _subset)."""
    split = split or self.config.train_split
    c = self.config
    size = size or c.image_size
    key = split if size == c.image_size else (split, size)
    if key not in self._data:
      self._data[key] = datasets.load_dataset(c.dataset, split, size, c.data_dir or None, c.download)
    return self._data[key]

  def check_splits(self) -> None:
    """Reads the evaluation splits now (in memory) or checks their names (streamed), so a
    bad split fails before training rather than after it; the report reuses what is read."""
    c = self.config
    splits = {c.test_split, c.eval_train_split or c.train_split}
    if self.streaming:
      from care_jax import input_pipeline  # noqa: PLC0415
      for split in splits:
        input_pipeline.check_split(c.dataset, split, c.data_dir or None, c.download)
    else:
      for split in splits:
        self.data(split)
      shared = self.test_examples_in_train_split()
      if shared:
        self.log(f"warning: {shared} of the {len(self.data(c.test_split).labels)} test_split={c.test_split!r} examples are "
                 f"also in the kNN bank / probe split {c.eval_train_split or c.train_split!r} of {c.dataset}: the "
                 "test accuracies are partly training accuracies; slice the source apart (train[:90%], test[90%:]) "
                 "or give it separate splits")

  def test_examples_in_train_split(self) -> Optional[int]:
    """Test examples the kNN bank / probe split also holds (a local source of one set of
    examples, or overlapping slices of one split); None where not known (streamed data)."""
    if self.streaming:
      return None
    c = self.config
    return datasets.shared_examples(self.data(c.test_split), self.data(c.eval_train_split or c.train_split))

  def num_classes(self) -> int:
    c = self.config
    if self.streaming:
      from care_jax import input_pipeline  # noqa: PLC0415 (TensorFlow reads the stream)
      return input_pipeline.streaming_num_classes(c.dataset, c.data_dir or None, c.download)
    return self.data(c.test_split).num_classes

  def _batches(self, split: str, limit: int):
    c = self.config
    common = dict(global_batch=c.eval_batch_size, aug=self.aug, process_index=jax.process_index(),
                  process_count=jax.process_count())
    if self.streaming:
      from care_jax import input_pipeline  # noqa: PLC0415
      return input_pipeline.streaming_eval_batches(c.dataset, split or c.train_split, data_dir=c.data_dir or None,
                                                   download=c.download, image_size=c.image_size, limit=limit,
                                                   **common)
    data = self.data(split)
    if limit and limit < len(data.images):
      data = type(data)(data.images[:limit], data.labels[:limit], data.num_classes)
    return datasets.eval_batches(data, **common)

  def add_data(self, split: str, data) -> None:
    """Reuse a split already in memory (the training loop's), if it is at image_size:
    pretraining images held at source_image_size are read again at image_size."""
    if data.images.shape[1:3] == (self.config.image_size,) * 2:
      self._data[split] = data

  def features(self, variables, tag, split: str, limit: int = 0):
    key = (tag, split, limit)
    if key in self._features:
      return self._features[key]
    on_disk = None
    if self._cache_dir is not None and isinstance(tag, int):
      safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{split}-{limit}")
      on_disk = self._cache_dir / f"step_{tag}" / f"{safe}.npz"
      made_by = self._cache_key(variables)
      cached = self._read_cache(on_disk, made_by) if on_disk.exists() else None
      if cached is not None:
        self._features[key] = cached
        return cached
    self._features[key] = extract_features(self.embed_fn, variables, self._batches(split, limit), self.to_global)
    if on_disk is not None and jax.process_index() == 0:
      on_disk.parent.mkdir(parents=True, exist_ok=True)
      f, z, y = self._features[key]
      # Streamed to the file, not buffered: an ImageNet bank's features run to gigabytes.
      with metric_writers.atomic_file(on_disk, "wb") as out:
        np.savez(out, features=f, projections=z, labels=y, made_by=made_by)
    return self._features[key]

  def _cache_key(self, variables) -> str:
    """What a cached extraction depends on beyond its split and step: the encoder's weights
    (per-leaf sums; a workdir retrained at the same step, say) and how images reach it."""
    sums = jax.device_get(_leaf_sums(jax.tree.leaves(variables)))
    c = self.config
    return json.dumps({"dataset": c.dataset, "image_size": c.image_size, "dtype": c.dtype,
                       "weights": [float(v) for pair in sums for v in pair]})

  def _read_cache(self, path, made_by: str):
    """A cached extraction, or None (and a log line) where it is damaged or was made by
    other weights or settings: then the features are extracted again and rewritten."""
    try:
      with path.open("rb") as f:
        cached = np.load(f)
        if "made_by" in cached.files and str(cached["made_by"]) == made_by:
          return cached["features"], cached["projections"], cached["labels"]
        why = "made by other weights or settings"
    except Exception as e:  # noqa: BLE001 (a damaged npz fails in several ways)
      why = f"unreadable ({type(e).__name__})"
    self.log(f"features cache {path} is {why}; extracting them again")
    return None

  def forget(self, tag) -> None:
    self._features = {k: v for k, v in self._features.items() if k[0] != tag}

  def embed(self, variables, views: np.ndarray) -> np.ndarray:
    """Unit embeddings f(x) of normalised float images; every process passes the same array."""
    b = self.config.eval_batch_size
    local = b // jax.process_count()
    lo = jax.process_index() * local
    return _map_padded(lambda chunk: to_host(self.embed_fn(variables, self.to_global(chunk[lo:lo + local]))[1]),
                       views, b)

  # -- the pieces of the report

  def knn(self, variables, tag, bank_limit: int = 0) -> dict:
    c = self.config
    bank_f, _, bank_y = self.features(variables, tag, c.eval_train_split or c.train_split, bank_limit)
    test_f, _, test_y = self.features(variables, tag, c.test_split)
    return knn_accuracy(bank_f, bank_y, test_f, test_y, num_classes=self.num_classes(),
                        k=c.knn_k, temperature=c.knn_temperature)

  def linear_probe(self, variables, tag, seeds: int = 1) -> dict:
    """linear_probe_protocol 'features': on the frozen features of unaugmented images;
    'augmented': the release's CIFAR/STL probe (augmented_linear_probe); 'lincls': its
    ImageNet-100 probe (lincls_probe), top1 the best epoch's (top1_last: the last's)."""
    c = self.config
    common = dict(num_classes=self.num_classes(), epochs=c.linear_probe_epochs, learning_rate=c.linear_probe_lr,
                  weight_decay=c.linear_probe_weight_decay, batch_size=c.linear_probe_batch_size)
    train_split = c.eval_train_split or c.train_split
    extra = {}
    if c.linear_probe_protocol == "augmented":
      runs = [self._augmented_linear_probe(variables, train_split, seed=c.seed + s, **common)
              for s in range(max(1, seeds))]
    elif c.linear_probe_protocol == "lincls":
      runs = [self._lincls_probe(variables, tag, train_split, seed=c.seed + s, **common) for s in range(max(1, seeds))]
      extra = {"top1_last_per_seed": [r["top1_last"] for r in runs], "best_epoch_per_seed": [r["best_epoch"] for r in runs],
               "lr_drop_epochs": list(c.linear_probe_lr_drop_epochs)}
    else:
      train_f, _, train_y = self.features(variables, tag, train_split)
      test_f, _, test_y = self.features(variables, tag, c.test_split)
      runs = [linear_probe(train_f, train_y, test_f, test_y, seed=c.seed + s, **common) for s in range(max(1, seeds))]
    top1 = np.array([r["top1"] for r in runs])
    return {"top1": float(top1.mean()), "top1_std": float(top1.std()), "top5": float(np.mean([r["top5"] for r in runs])),
            "seeds": [r["seed"] for r in runs], "top1_per_seed": top1.tolist(), "epochs": c.linear_probe_epochs,
            "protocol": c.linear_probe_protocol, **extra}

  def _lincls_probe(self, variables, tag, train_split: str, *, seed: int, **kwargs) -> dict:
    # BatchNorm stays in inference mode, so the test features are the frozen encoder's:
    # the cached extraction the kNN uses.
    c = self.config
    test_f, _, test_y = self.features(variables, tag, c.test_split)
    common = dict(test_features=test_f, test_labels=test_y, mesh=self.mesh, aug=self.aug, seed=seed,
                  drop_epochs=tuple(c.linear_probe_lr_drop_epochs), **kwargs)
    if self.streaming:
      from care_jax import input_pipeline  # noqa: PLC0415
      batches = functools.partial(
          input_pipeline.streaming_lincls_batches, c.dataset, train_split, data_dir=c.data_dir or None,
          download=c.download, aug=self.aug, global_batch=c.linear_probe_batch_size, seed=seed,
          process_index=jax.process_index(), process_count=jax.process_count())
      return lincls_probe(self.model, variables, lambda epoch: batches(epoch=epoch), to_global=self.to_global,
                          **common)
    # Cropped from the images at the side pretraining crops from, as the augmented probe.
    data = self.data(train_split, config_lib.source_size(c))
    return lincls_probe(self.model, variables, images=data.images, labels=data.labels, **common)

  def _augmented_linear_probe(self, variables, train_split: str, *, seed: int, num_classes: int, **kwargs) -> dict:
    # Cropped from the images at the side pretraining crops from (STL-10: the 96x96
    # originals), as the release's probe augments its originals; tested at image_size.
    data = self.data(train_split, config_lib.source_size(self.config))
    classifier, probed = augmented_linear_probe(self.model, variables, data.images, data.labels,
                                                num_classes=num_classes, aug=self.aug, mesh=self.mesh, seed=seed,
                                                **kwargs)
    # The test features under the running statistics the probe left: never cached.
    test_f, _, test_y = extract_features(self.embed_fn, probed, self._batches(self.config.test_split, 0),
                                         self.to_global)
    return {**probe_accuracy(classifier, test_f, test_y, num_classes), "seed": seed}

  def _subset(self, variables, tag):
    """The first wahba_examples test images and their unaugmented embeddings.

    The embeddings are the test features' projections (same normalisation, same
    encoder), so the three geometry reports reuse the one extraction.
    """
    c = self.config
    if self.streaming:  # only the subset in memory
      if ("head", c.test_split) not in self._data:
        from care_jax import input_pipeline  # noqa: PLC0415
        self._data["head", c.test_split] = input_pipeline.load_streaming_head(
            c.dataset, c.test_split, c.wahba_examples, data_dir=c.data_dir or None, download=c.download,
            image_size=c.image_size)
      test = self._data["head", c.test_split]
      key = (tag, "head", c.test_split)
      if key not in self._features:  # every process embeds the same head (not its own part)
        self._features[key] = self.embed(variables, datasets.normalized(test.images, self.aug))
      return test.images, self._features[key]
    test = self.data(c.test_split)
    n = min(c.wahba_examples, len(test.images))
    return test.images[:n], self.features(variables, tag, self.config.test_split)[1][:n]

  def wahba(self, variables, tag) -> dict:
    """Per trial one augmentation applied to the whole subset: Wahba error and gamma_f."""
    images, z = self._subset(variables, tag)
    h, w = images.shape[1:3]
    trials = []
    for trial in range(self.config.wahba_trials):
      params = one_augmentation(self.config.seed, trial, h, w, self.aug)
      z_aug = self.embed(variables, apply_augmentation(images, params, self.aug))
      trials.append({"trial": trial, "augmentation": params,
                     **wahba_trial(z, z_aug, config_lib.EQUIVARIANCE_FORMS[self.config.geometry])})
    if not trials:
      return {"wahba_error_mean": None, "wahba_error_max": None, "relative_equivariance": None}
    return summarize_trials(trials, len(images))

  def composition(self, variables, tag) -> dict:
    """Corollary 1: ||R_{b o a} - R_b R_a||_F / (2 sqrt(d)) for pairs of sampled augmentations."""
    images, z = self._subset(variables, tag)
    h, w = images.shape[1:3]
    pairs = []
    for pair in range(self.config.composition_trials):
      a = one_augmentation(self.config.seed + 1, 2 * pair, h, w, self.aug)
      b = one_augmentation(self.config.seed + 1, 2 * pair + 1, h, w, self.aug)
      view_a = apply_augmentation(images, a, self.aug)
      z_a = self.embed(variables, view_a)
      z_b = self.embed(variables, apply_augmentation(images, b, self.aug))
      z_ba = self.embed(variables, apply_augmentation(datasets.to_uint8(view_a, self.aug), b, self.aug))
      pairs.append(float(geometry.composition_error(z, z_a, z_ba, z_b)))
    return {"composition_error_mean": float(np.mean(pairs)) if pairs else None, "composition_errors": pairs}

  def colour_sensitivity(self, variables, tag) -> dict:
    """Mean squared embedding displacement ||f(t x) - f(x)||^2 per single transform t.

    colour_sensitivity = mean over colour transforms (hue +-0.1, grayscale) /
    mean over other transforms (centre crop of half the side, flip, blur sigma 1).
    Higher = colour moves the embedding more, relative to geometry: the paper's
    claim is that CARE keeps colour information SimCLR discards. Grey data
    (Fashion-MNIST) gives 0 by construction: hue and grayscale do not change it.
    """
    images, z = self._subset(variables, tag)
    groups = colour_transforms(*images.shape[1:3])
    moved = {}
    for transforms in groups.values():
      for name, params in transforms.items():
        z_t = self.embed(variables, apply_augmentation(images, params, self.aug))
        moved[name] = float(np.mean(np.sum((z_t - z) ** 2, axis=1)))
    colour = np.mean([moved[k] for k in groups["colour"]])
    other = np.mean([moved[k] for k in groups["other"]])
    return {"colour_sensitivity": float(colour / other) if other > 0 else None, "displacement": moved}

  def report(self, variables, tag, random_init_variables=None) -> dict:
    """Everything report.json holds, computed on the test split."""
    c = self.config
    started = time.perf_counter()
    knn = self.knn(variables, tag)
    probe = self.linear_probe(variables, tag, c.linear_probe_seeds)
    self.log(f"kNN top-1 {knn['top1']:.2f}%, linear probe top-1 {probe['top1']:.2f}% "
             f"({time.perf_counter() - started:.0f} s)")
    report = {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn": knn,
              "linear_probe_top1": probe["top1"], "linear_probe_top5": probe["top5"], "linear_probe": probe}
    report.update(self.wahba(variables, tag))
    report.update(self.composition(variables, tag))
    report.update(self.colour_sensitivity(variables, tag))
    if random_init_variables is not None:
      r_knn = self.knn(random_init_variables, "random_init")
      r_probe = self.linear_probe(random_init_variables, "random_init", c.linear_probe_seeds)
      self.forget("random_init")
      report["random_init"] = {"knn_top1": r_knn["top1"], "linear_probe_top1": r_probe["top1"]}
      self.log(f"random-init encoder: kNN top-1 {r_knn['top1']:.2f}%, linear probe top-1 {r_probe['top1']:.2f}%")
    report["test_examples_in_train_split"] = self.test_examples_in_train_split()
    report["eval_seconds"] = time.perf_counter() - started
    return report


# ------------------------------------------------------------------ command line

def evaluation_dir(workdir, step: int, overrides: dict | None = None):
  """Where evaluate_workdir writes: workdir/evaluations/step_<N>[_<field>=<value>,...].

  Never workdir/report.json, the training run's final report: re-evaluating an
  older step, or with other probe settings, must not replace it, and a report
  there is what tells experiments/paper_runs.py that a run has finished."""
  tag = ",".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
  return workdir / "evaluations" / (f"step_{step}" + (f"_{tag}" if tag else ""))


def evaluate_workdir(workdir: str, step: int | None = None, overrides: dict | None = None,
                     log: Callable[[str], None] = print) -> dict:
  """Restores a run's latest (or <= step) checkpoint read-only and writes its report and
  figures into evaluation_dir(workdir, that step, overrides)."""
  from etils import epath  # noqa: PLC0415

  from care_jax import checkpoints, config_lib, train  # noqa: PLC0415
  # orbax wants absolute paths (a relative --workdir made every checkpoint look unreadable).
  workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
  saved = config_lib.saved_config(workdir, "restore it, or delete it and rerun care_jax.main with the run's "
                                           "--config (it resumes from the checkpoints and writes it again)")
  if saved is None:
    raise config_lib.ConfigError(f"workdir={str(workdir)!r} has no config.json; point --workdir at a training run")
  config = config_lib.default_config()
  config.update(saved)
  for key, value in (overrides or {}).items():
    config[key] = value
  mesh = train.make_mesh()
  config_lib.validate(config, jax.device_count())
  model = train.build_model(config)
  like = train.create_train_state(model, train.make_optimizer(config, optax.constant_schedule(0.0)), config, mesh)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, read_only=True, log=log)
  saved = ckpt.all_steps()
  state, restored_step = ckpt.restore_latest(like, at_most=step)
  ckpt.close()
  if state is None and saved and step is not None and step < saved[0]:
    raise config_lib.ConfigError(f"--step={step}: workdir={str(workdir)!r} has no checkpoint at or before it; "
                                 f"its saved steps are {', '.join(map(str, saved))}")
  if state is None:
    raise config_lib.ConfigError(f"workdir={str(workdir)!r} has no checkpoint yet; wait for the first save")
  newest = "" if step is None or restored_step == step else f" (the newest at or before --step={step})"
  log(f"evaluating {workdir / 'checkpoints' / str(restored_step)}{newest}")
  evaluator = RunEvaluator(config, model, mesh, log=log, cache_dir=workdir / "features")
  evaluator.check_splits()
  baseline = train.random_init_variables(model, config, mesh) if config.random_init_baseline else None
  report = evaluator.report(train.variables_of(state), restored_step, baseline)
  report["step"] = int(restored_step)
  report["overrides"] = dict(overrides or {})
  out_dir = evaluation_dir(workdir, int(restored_step), overrides)
  write_report(workdir, report, out_dir)
  log(f"report: {out_dir / 'report.json'}")
  return report


def summary_line(report: dict) -> str:
  """The report's headline figures on one line (Wahba and gamma_f left out when wahba_trials=0)."""
  line = f"kNN top-1 {report['knn_top1']:.2f}%  linear probe top-1 {report['linear_probe_top1']:.2f}%"
  if report.get("wahba_error_mean") is not None:
    line += (f"  Wahba error mean {report['wahba_error_mean']:.4f} max {report['wahba_error_max']:.4f}  "
             f"gamma_f {report['relative_equivariance']:.4f}")
  return line


def write_report(workdir, report: dict, out_dir=None) -> None:
  """report.json and the PNG figures into out_dir (default: workdir; process 0 only)."""
  from etils import epath  # noqa: PLC0415

  from care_jax import plots  # noqa: PLC0415
  if jax.process_index() == 0:
    out_dir = epath.Path(workdir if out_dir is None else out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_writers.write_atomically(out_dir / "report.json", json.dumps(report, indent=2))
    plots.write_plots(workdir, report, out_dir)


def main(argv) -> None:
  from absl import flags, logging  # noqa: PLC0415

  from care_jax import config_lib  # noqa: PLC0415
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; use --workdir=..., --step=N and the override flags "
          "(--helpshort lists them)", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  overrides = {k: getattr(f, k) for k in ("linear_probe_seeds", "linear_probe_protocol", "linear_probe_epochs",
                                          "linear_probe_lr", "linear_probe_weight_decay", "wahba_trials",
                                          "composition_trials")
               if getattr(f, k) is not None}
  try:
    report = evaluate_workdir(f.workdir, f.step, overrides, log=lambda m: print(m, file=sys.stderr, flush=True))
  except config_lib.ConfigError as e:
    message = str(e)
    for key in overrides:  # the fix is this command's flag, not the trainer's --config.<field>
      message = message.replace(f"--config.{key}=", f"--{key}=")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=1))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
  flags.DEFINE_integer("step", None, "Evaluate the newest checkpoint at or before this step (default: latest).")
  flags.DEFINE_integer("linear_probe_seeds", None, "Override: number of linear-probe seeds.")
  flags.DEFINE_string("linear_probe_protocol", None,
                      "Override: features, augmented (the release's CIFAR/STL probe) or lincls (its ImageNet-100 one).")
  flags.DEFINE_integer("linear_probe_epochs", None, "Override: linear-probe epochs.")
  flags.DEFINE_float("linear_probe_lr", None, "Override: the probe's learning rate (lincls: 30; the others: 1e-3).")
  flags.DEFINE_float("linear_probe_weight_decay", None, "Override: the probe's L2 weight decay (lincls: 1e-4).")
  flags.DEFINE_integer("wahba_trials", None, "Override: sampled augmentations in the Wahba report.")
  flags.DEFINE_integer("composition_trials", None, "Override: augmentation pairs in the Corollary-1 report.")
  app.run(main)
