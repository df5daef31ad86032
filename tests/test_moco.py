"""MoCo-v2 + CARE: queue, momentum encoder, shuffled BatchNorm, device independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from care_jax import losses, moco, train
from tests.test_train import _assert_same_updates, _batch, _flops, _run, _setup, _tiny_config


def _moco_config(**overrides):
  base = dict(objective="moco_care", moco_queue_size=128, moco_bn_groups=4, temperature=0.2)
  base.update(overrides)
  return _tiny_config(**base)


def test_queue_is_a_fifo_that_wraps():
  b, k, d = 4, 12, 3
  queue, ptr = jnp.zeros((k, d)), jnp.zeros((), jnp.int32)
  expected = np.zeros((k, d))
  for step in range(5):  # 5 batches into room for 3: wraps twice
    keys = np.full((b, d), step + 1.0)
    queue, ptr = moco.enqueue(queue, ptr, jnp.asarray(keys))
    start = (step * b) % k
    expected[start:start + b] = keys
    np.testing.assert_array_equal(queue, expected)
    assert int(ptr) == ((step + 1) * b) % k
  # After 5 enqueues the queue holds batches 5, 3, 4 (oldest overwritten first).
  np.testing.assert_array_equal(queue[:, 0], np.repeat([4.0, 5.0, 3.0], b))


def test_keys_and_queue_get_no_gradient():
  rng = np.random.default_rng(0)
  q, k = jnp.asarray(rng.normal(size=(4, 5))), jnp.asarray(rng.normal(size=(4, 5)))
  queue = jnp.asarray(rng.normal(size=(8, 5)))
  g_q, g_k, g_queue = jax.grad(losses.moco_info_nce, argnums=(0, 1, 2))(q, k, queue, 0.2)
  assert np.abs(g_q).max() > 0
  np.testing.assert_array_equal(g_k, 0.0)
  np.testing.assert_array_equal(g_queue, 0.0)


def _moco_sgd_config(objective="moco_care"):
  """The one-step SGD config of the 1-vs-8-device gradient test; the momentum test runs its 1-device
  step, a cache hit of the same compiled program. moco_care gives e1, e2 to half the batch, as the
  release's ImageNet-100 runs do (equiv_batch_size; the whole-batch case: test_train)."""
  care = objective == "moco_care"
  return _moco_config(objective=objective, optimizer="sgd", learning_rate=0.1, weight_decay=0.0,
                      equiv_weight=0.5 if care else 0.0, equiv_batch_size=16 if care else 0, moco_bn_groups=2,
                      moco_momentum=0.9)


def _train_apply(model):
  """model.apply in train mode, jitted: op by op, a forward pass took seconds of tiny compiles."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=True, mutable=["batch_stats"]))


def _grouped_reference(apply, variables, images, groups):
  """Independent of moco.grouped_apply: one plain forward (`_train_apply`) per group, in a loop;
  the running statistics are the first group's."""
  n = len(images) // groups
  outs, stats = [], []
  for g in range(groups):
    (_, z), upd = apply(variables, images[g * n:(g + 1) * n])
    outs.append(z)
    stats.append(upd["batch_stats"])
  return jnp.concatenate(outs), stats[0]  # running statistics: group 0's (DDP keeps rank 0's buffers)


def test_shuffled_bn_changes_only_the_batchnorm_grouping():
  config = _moco_config()
  model = train.build_model(config)
  images = jnp.asarray(_batch(config)["x2"])
  state = jax.device_get(_setup(config, jax.devices()[:1])[0])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  perm = jax.random.permutation(jax.random.PRNGKey(3), len(images))
  key_forward = jax.jit(lambda v, x, groups, perm: moco.key_forward(model, v, x, groups, perm), static_argnums=2)
  apply = _train_apply(model)
  keys, stats = key_forward(variables, images, 4, perm)
  # Row i's key is what a plain forward of ITS group of the permuted batch gives it.
  ref, ref_stats = _grouped_reference(apply, variables, images[perm], 4)
  np.testing.assert_allclose(keys, ref[jnp.argsort(perm)], rtol=1e-5, atol=5e-6)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # With one group the shuffle is invisible: the plain full-batch forward.
  keys1, _ = key_forward(variables, images, 1, perm)
  (_, plain), _ = apply(variables, images)
  np.testing.assert_allclose(keys1, plain, rtol=1e-5, atol=5e-6)
  # With several groups it does change the keys (BatchNorm sees other rows).
  unshuffled, _ = key_forward(variables, images, 4, jnp.arange(len(images)))
  assert np.abs(np.asarray(unshuffled) - np.asarray(keys)).max() > 1e-3


def test_momentum_encoder_follows_its_formula_and_the_queue_fills():
  config = _moco_sgd_config()  # its 1-device step: the program the test below compiles
  state, step, to_global = _setup(config, jax.devices()[:1])
  initial = jax.device_get(state)
  # The key encoder starts as a copy of the query encoder.
  for a, b in zip(jax.tree.leaves(initial.moco["params"]), jax.tree.leaves(initial.params)):
    np.testing.assert_array_equal(a, b)
  states = [initial]
  for seed in range(3):
    state, _ = step(state, {k: to_global(v) for k, v in _batch(config, seed).items()})
    states.append(jax.device_get(state))
  for before, after in zip(states[:-1], states[1:]):
    expected = jax.tree.map(lambda k, q: 0.9 * k + 0.1 * q, before.moco["params"], before.params)
    for a, b in zip(jax.tree.leaves(after.moco["params"]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  b = config.batch_size
  assert int(states[-1].moco["queue_ptr"]) == 3 * b % config.moco_queue_size
  # Newly queued keys are unit vectors from the key encoder; the rest is the initial queue.
  queued = states[-1].moco["queue"]
  np.testing.assert_allclose(np.linalg.norm(queued[:3 * b], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(queued[3 * b:], initial.moco["queue"][3 * b:])
  assert not np.allclose(queued[:b], initial.moco["queue"][:b])


@pytest.mark.parametrize("objective", ["moco_care", "moco"])
def test_step_on_one_and_eight_devices_is_the_gradient_of_the_loss_with_keys_held_fixed(objective):
  # The reference is independent of the step: keys from the EMA encoder
  # computed up front, the per-group forwards in a Python loop, jax.grad of the
  # plain loss. Two BatchNorm groups: the reference unrolls groups x views
  # forward passes, and compiling its gradient is much of this test's time.
  # SGD: after one step its momentum buffer IS the gradient.
  config = _moco_sgd_config(objective)
  use_equi = objective == "moco_care"
  model = train.build_model(config)
  batch = _batch(config, seed=5)
  assert len(batch["x1"]) == 32 and (len(batch["e1"]) == 16) == use_equi
  state0 = jax.device_get(_setup(config, jax.devices()[:1])[0])
  key_vars = {"params": moco.momentum_update(state0.moco["params"], state0.params, config.moco_momentum),
              "batch_stats": state0.moco["batch_stats"]}
  perm = jax.random.permutation(jax.random.fold_in(state0.rng, 0), config.batch_size)
  apply = _train_apply(model)
  keys_shuffled, key_stats = _grouped_reference(apply, key_vars, jnp.asarray(batch["x2"])[perm], 2)
  keys = keys_shuffled[jnp.argsort(perm)]

  def loss(params):
    stats, z = state0.batch_stats, {}
    for view in ("x1", "e1", "e2") if use_equi else ("x1",):
      z[view], stats = _grouped_reference(apply, {"params": params, "batch_stats": stats},
                                          jnp.asarray(batch[view]), 2)
    nce = losses.moco_info_nce(z["x1"], keys, state0.moco["queue"], config.temperature)
    return nce + (config.equiv_weight * losses.equivariance_loss(z["e1"], z["e2"], config.equiv_splits)
                  if use_equi else 0.0)

  grads = jax.jit(jax.grad(loss))(state0.params)  # jit: eager op-by-op took a minute
  # The running statistics: the query encoder's follow its passes in order (x1, then e1, e2),
  # the key encoder's its own shuffled pass (group 0 of the permuted batch).
  query_stats = state0.batch_stats
  for view in ("x1", "e1", "e2") if use_equi else ("x1",):
    _, query_stats = _grouped_reference(apply, {"params": state0.params, "batch_stats": query_stats},
                                        jnp.asarray(batch[view]), 2)
  expected = jax.tree.map(lambda p, g: p - config.learning_rate * g, state0.params, grads)
  one_device, eight_devices = {}, {}
  state1, metrics1 = _run(config, jax.devices()[:1], batch, programs=one_device)
  state8, metrics8 = _run(config, jax.devices(), batch, programs=eight_devices)
  _assert_same_updates(state8.params, expected, state0.params, rtol=5e-4)
  _assert_same_updates(state8.batch_stats, query_stats, state0.batch_stats, rtol=5e-4)
  _assert_same_updates(state8.moco["batch_stats"], key_stats, state0.moco["batch_stats"], rtol=5e-4)
  np.testing.assert_allclose(state8.moco["queue"][:config.batch_size], keys, rtol=1e-4, atol=1e-5)
  # One and eight devices: the same step to float32 round-off. Data-parallel,
  # the shuffled key pass included: each device does about an eighth of the
  # work (it was 22%, the key encoder replicated; now ~13.5%).
  assert _flops(eight_devices["step"]) < 0.17 * _flops(one_device["step"])
  for key in ("loss", "info_nce", "grad_norm"):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=5e-5)
  assert ("equivariance" in metrics1) == use_equi
  _assert_same_updates(state8.params, state1.params, state0.params)
  _assert_same_updates(state8.opt_state, state1.opt_state, state0.opt_state)
  _assert_same_updates(state8.moco["batch_stats"], state1.moco["batch_stats"], state0.moco["batch_stats"])
  np.testing.assert_allclose(state8.moco["queue"], state1.moco["queue"], rtol=1e-4, atol=1e-5)
