"""MoCo-v2 with CARE: momentum key encoder, queue of negatives, shuffled BatchNorm.

The paper runs CARE on a MoCo-v2 backbone (ImageNet-100: 74.22 vs 73.16 top-1).
The pieces, as pure functions of the state held in TrainState.moco:

  momentum_update   key encoder <- m * key + (1 - m) * query, before the keys
                    are computed (MoCo's order), on parameters only: the key
                    encoder's BatchNorm running statistics come from its own
                    forward passes.
  grouped_apply     the encoder with BatchNorm statistics per group of B/G
                    consecutive rows (MoCo's per-GPU BatchNorm): the model with
                    bn_groups=G, one pass; the running statistics are group 0's.
  key_forward       MoCo's shuffled BN for a jit-sharded step: permute the key
                    batch (a gather XLA turns into cross-device traffic), run
                    grouped_apply, undo the permutation. A query and its
                    positive key then see BatchNorm statistics of different
                    groups, so the loss cannot be lowered by reading the batch
                    statistics (the leak MoCo's shuffle removes). The grouping
                    is fixed by the config, not by the device count, so one and
                    eight devices compute the same step.
  enqueue           the queue [K, D] is a FIFO: the newest B keys overwrite the
                    oldest, at queue_ptr, which advances by B modulo K.

make_train_step builds the jit-able step; train.py uses it for the objectives
'moco' (InfoNCE against the queue) and 'moco_care' (+ lambda * L_equi on the
query encoder's chunk-shared views, exactly as in the SimCLR variant).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from care_jax import config_lib, losses, random_util


def init_state(params, batch_stats, rng, queue_size: int, dim: int) -> dict:
  """Key encoder = a copy of the query encoder; the queue starts as random unit vectors (as MoCo)."""
  queue = random_util.drawn_flat(jax.random.normal, rng, (queue_size, dim), dtype=jnp.float32)
  queue = queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
  return {"params": jax.tree.map(jnp.copy, params), "batch_stats": jax.tree.map(jnp.copy, batch_stats),
          "queue": queue, "queue_ptr": jnp.zeros((), jnp.int32)}


def momentum_update(key_params, query_params, momentum: float):
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params, query_params)


def grouped_apply(model, variables, images, groups: int):
  """model.apply(train=True) with BatchNorm over `groups` consecutive row groups.

  Returns (features, projections, new batch_stats of group 0): MoCo's
  DistributedDataParallel broadcasts rank 0's buffers before every forward, so
  the running statistics a run keeps follow the first GPU's batches alone. The
  same model with bn_groups=groups (BatchNorm's own grouping, config bn_groups):
  one pass over the whole batch.
  """
  grouped = model.clone(backbone=model.backbone.clone(bn_groups=groups), head=model.head.clone(bn_groups=groups))
  (features, z), updates = grouped.apply(variables, images, train=True, mutable=["batch_stats"])
  return features, z, updates["batch_stats"]


def key_forward(model, variables, images, groups: int, permutation):
  """Keys in the batch's order, with BatchNorm over the shuffled groups; no gradient."""
  _, keys, stats = grouped_apply(model, variables, _split_by_rows(images[permutation]), groups)
  keys = keys[jnp.argsort(permutation)]
  return jax.lax.stop_gradient(keys), stats


def _split_by_rows(x):
  """x split by rows over the 'data' axis of the mesh the step is lowered under (train.lower_train_step).

  A gather by a random permutation leaves XLA free to place its result
  anywhere, and it chose every device: it gathered the batch onto each one
  and ran the key encoder's forward pass replicated (per device 22% of the
  1-device step's FLOPs on 8 devices instead of 13%). Outside such a mesh
  (one device, a plain jit) x is returned as it is.
  """
  if "data" not in jax.sharding.get_abstract_mesh().axis_names:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec("data"))


def enqueue(queue, queue_ptr, keys):
  """FIFO: keys overwrite rows [ptr, ptr + B); the pointer wraps at K (K a multiple of B)."""
  queue = jax.lax.dynamic_update_slice_in_dim(queue, keys.astype(queue.dtype), queue_ptr, axis=0)
  return queue, (queue_ptr + keys.shape[0]) % queue.shape[0]


def make_train_step(model, tx, config, schedule: optax.Schedule, finish: Callable) -> Callable:
  """train_step(state, batch) -> (state, metrics) for objective moco / moco_care.

  finish(state, loss, terms, grads, params, batch_stats, opt_state, extra, z1)
  is train.py's shared tail (NaN guard and metrics), so both step kinds log
  and guard the same way.
  """
  groups = int(config.moco_bn_groups)
  momentum = float(config.moco_momentum)
  use_equi = config_lib.uses_equivariance(config)

  def loss_fn(params, batch_stats, key_variables, queue, batch):
    variables = {"params": params, "batch_stats": batch_stats}
    _, q, batch_stats = grouped_apply(model, variables, batch["x1"], groups)
    keys, key_stats = key_forward(model, key_variables, batch["x2"], groups, batch["permutation"])
    nce = losses.moco_info_nce(q, keys, queue, config.temperature)
    terms = {"info_nce": nce}
    total = nce
    if use_equi:
      z = {}
      for view in ("e1", "e2"):
        _, z[view], batch_stats = grouped_apply(model, {"params": params, "batch_stats": batch_stats},
                                                batch[view], groups)
      terms["equivariance"] = losses.equivariance_loss(z["e1"], z["e2"], config.equiv_splits)
      total = total + config.equiv_weight * terms["equivariance"]
    return total, (terms, batch_stats, key_stats, keys, q)

  def train_step(state, batch):
    moco = state.moco
    key_params = momentum_update(moco["params"], state.params, momentum)
    permutation = jax.random.permutation(jax.random.fold_in(state.rng, state.step), batch["x2"].shape[0])
    (loss, (terms, batch_stats, key_stats, keys, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, {"params": key_params, "batch_stats": moco["batch_stats"]},
        moco["queue"], dict(batch, permutation=permutation))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    queue, queue_ptr = enqueue(moco["queue"], moco["queue_ptr"], keys)
    new_moco = {"params": key_params, "batch_stats": key_stats, "queue": queue, "queue_ptr": queue_ptr}
    return finish(state, loss, terms, grads, params, batch_stats, opt_state, new_moco, q)

  return train_step
