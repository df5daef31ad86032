"""The train step against independent checks: 1 vs 8 devices, the guard, optimisers."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from care_jax import augment_config, config_lib, losses, train
from tests.test_losses import (np_equivariance, np_hyperbolic_info_nce, np_info_nce,
                               np_wang_isola)


def _tiny_config(**overrides):
  """configs/quickstart.py:smoke (a 4-channel ResNet-18 on 16x16 images) with overrides."""
  c = config_lib.load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py",
                                  "smoke")
  c.num_train_steps = 10
  for k, v in overrides.items():
    c[k] = v
  return c


def _one_step_sgd_config(objective="care", **overrides):
  """_tiny_config under SGD with momentum and weight decay, as the 1-vs-8-device test compares it.

  Tests that compile its 1- or 8-device step share the program through the
  persistent compilation cache (batched-vs-sequential, the SGD gradient,
  layout and finite-step tests, test_profile_step).
  """
  return _tiny_config(optimizer="sgd", learning_rate=0.05, weight_decay=1e-3, objective=objective,
                      equiv_weight=0.5, **overrides)


def _batch(config, seed=0):
  """Random views; e1, e2 only at the equivariance rows where equiv_batch_size sets fewer."""
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  batch = {v: rng.normal(size=shape).astype(np.float32) for v in train.VIEWS}
  rows = config_lib.equivariance_rows(config.batch_size, config.equiv_splits, config_lib.equiv_batch(config))
  return {v: x[rows] if v in ("e1", "e2") else x for v, x in batch.items()}


def _setup(config, devices, programs=None):
  """(state, step, to_global); `programs`, if given, receives the compiled step as "step"."""
  mesh = train.make_mesh(devices)
  model = train.build_model(config)
  durations = config_lib.resolve_durations(config, 10 * config.batch_size)
  schedule = train.learning_rate_schedule(config, durations)
  tx = train.make_optimizer(config, schedule)
  state = train.create_train_state(model, tx, config, mesh)
  train_step, compiled = train.make_train_step(model, tx, config, schedule), programs if programs is not None else {}

  def step(state, batch):  # compiled for the first batch it is given, as the training loop does
    if "step" not in compiled:
      compiled["step"], state = train.compile_train_step(train_step, mesh, state, batch)
    return compiled["step"](state, batch)

  return state, step, train.global_batch_builder(mesh)


def _run(config, devices, batch, steps=1, programs=None):
  state, step, to_global = _setup(config, devices, programs)
  for _ in range(steps):
    state, metrics = step(state, {k: to_global(v) for k, v in batch.items()})
  return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_eight_fake_devices_are_present():
  assert jax.device_count() == 8


def _assert_same_updates(new_a, new_b, old, rtol=2e-4):
  """new_a - old == new_b - old, relative to the size of each leaf's update."""
  for a, b, o in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b), jax.tree.leaves(old)):
    da, db = np.asarray(a) - np.asarray(o), np.asarray(b) - np.asarray(o)
    assert np.abs(da - db).max() <= rtol * np.abs(da).max() + 1e-9, (np.abs(da - db).max(), np.abs(da).max())


@pytest.mark.parametrize("objective, bn_groups", [("care", 1), ("equi_unif", 1), ("care", 2)])
def test_one_and_eight_devices_give_same_loss_gradients_and_updates(objective, bn_groups):
  # SGD (not Adam, whose normalisation hides a gradient scaled by N) with
  # momentum and weight decay; after one step the momentum buffer IS the
  # gradient, so comparing opt_state compares gradients. (A second step
  # amplifies round-off through BatchNorm to ~1e-3 on these 4-channel nets.)
  # bn_groups=2: the release's 2-GPU nn.DataParallel BatchNorm, per half batch.
  config = _one_step_sgd_config(objective, bn_groups=bn_groups)
  batch = _batch(config)
  state0 = jax.device_get(_setup(config, jax.devices()[:1])[0])
  one_device, eight_devices = {}, {}
  state1, metrics1 = _run(config, jax.devices()[:1], batch, programs=one_device)
  state8, metrics8 = _run(config, jax.devices(), batch, programs=eight_devices)
  # Reduction order differs between the programs: float32 round-off only (a
  # gradient N times too large, or per-device BatchNorm, would be off by O(1)).
  for key in ("loss", "info_nce", "equivariance", "grad_norm"):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=5e-5)
  assert metrics1["equivariance"] > 0
  if bn_groups > 1:  # the groups reach the model: the global-statistics step's loss differs
    ungrouped = _run(_one_step_sgd_config(objective), jax.devices()[:1], batch)[1]
    assert abs(float(ungrouped["loss"]) - float(metrics1["loss"])) > 1e-3
  _assert_same_updates(state8.params, state1.params, state0.params)
  _assert_same_updates(state8.batch_stats, state1.batch_stats, state0.batch_stats)
  _assert_same_updates(state8.opt_state, state1.opt_state, state0.opt_state)
  # Data-parallel: each of the 8 devices does about an eighth of the step's
  # work (the model's passes; the small loss is computed whole on each).
  # Vmapping the model over a view axis once made XLA gather the batch onto
  # every device and run the step replicated: as many FLOPs per device as the
  # 1-device program (measured ratio 1.00, here 0.13-0.14).
  assert config.view_batching == "batched"  # the smoke preset's; sequential: test_batched_views_equal_...
  assert _flops(eight_devices["step"]) < 0.2 * _flops(one_device["step"])


def test_sgd_update_is_minus_lr_times_gradient_of_the_global_loss():
  # Independent of the sharded program: jax.grad of the plain (unsharded)
  # loss of the same four views (_reference_sgd_step). The first SGD step:
  # the momentum buffer is the gradient.
  config = _one_step_sgd_config()
  batch = _batch(config, seed=3)
  state0, _, _ = _setup(config, jax.devices()[:1])
  state0 = jax.device_get(state0)
  _, _, expected = _reference_sgd_step(config, state0, batch)
  state8, _ = _run(config, jax.devices(), batch)
  _assert_trees_close(state8.params, expected, rtol=1e-4, atol=1e-6)


def _reference_sgd_step(config, state0, batch):
  """(loss, running BatchNorm statistics, params after one SGD step) from jax.grad of the plain
  loss of four sequential forward passes, with weight decay on kernels only (torch's
  weight_decay; BatchNorm and bias vectors are not decayed)."""
  model = train.build_model(config)

  def loss(params):
    stats, z = state0.batch_stats, {}
    for v in train.VIEWS:
      (_, z[v]), upd = model.apply({"params": params, "batch_stats": stats}, jnp.asarray(batch[v]),
                                   train=True, mutable=["batch_stats"])
      stats = upd["batch_stats"]
    total = losses.care_loss(z["x1"], z["x2"], z["e1"], z["e2"], temperature=config.temperature,
                             equiv_weight=config.equiv_weight, num_chunks=config.equiv_splits)[0]
    return total, stats

  # jit: eager op-by-op took a minute.
  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state0.params)
  lr, wd = config.learning_rate, config.weight_decay
  params = jax.tree.map(lambda p, g: p - lr * (g + (wd * p if p.ndim > 1 else 0.0)), state0.params, grads)
  return value, stats, params


def test_an_equivariance_sub_batch_step_is_the_gradient_of_its_loss_on_one_and_eight_devices():
  # The release's ImageNet-100 "equivariant batch": e1, e2 hold 16 of the 32 images
  # (2 of each chunk's 4). Independent truth: jax.grad of the plain loss of
  # sequential passes over those views; the smoke preset's batched step makes
  # two passes (x1, x2 then e1, e2) and must stay data-parallel.
  config = _one_step_sgd_config(equiv_batch_size=16)
  batch = _batch(config, seed=5)
  assert batch["e1"].shape[0] == 16 and batch["x1"].shape[0] == 32
  state0 = jax.device_get(_setup(config, jax.devices()[:1])[0])
  expected_loss, expected_stats, expected = _reference_sgd_step(config, state0, batch)
  one_device, eight_devices = {}, {}
  state1, metrics1 = _run(config, jax.devices()[:1], batch, programs=one_device)
  state8, metrics8 = _run(config, jax.devices(), batch, programs=eight_devices)
  for metrics in (metrics1, metrics8):
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=5e-5)
  _assert_same_updates(state8.params, state1.params, state0.params)
  _assert_trees_close(state8.params, expected, rtol=1e-4, atol=1e-6)
  _assert_same_updates(state8.batch_stats, expected_stats, state0.batch_stats)
  assert _flops(eight_devices["step"]) < 0.2 * _flops(one_device["step"])


@pytest.mark.parametrize("overrides", [{}, {"geometry": "hyperboloid"}, {"geometry": "symplectic"},
                                       {"objective": "moco_care", "moco_queue_size": 64, "moco_bn_groups": 4}],
                         ids=["sphere", "hyperboloid", "symplectic", "moco_care"])
def test_loss_decreases_over_steps_on_a_fixed_batch(overrides):
  config = _tiny_config(learning_rate=3e-3, **overrides)
  batch = _batch(config, seed=1)
  state, step, to_global = _setup(config, jax.devices())
  global_batch = {k: to_global(v) for k, v in batch.items()}
  history = []
  for _ in range(8):
    state, metrics = step(state, global_batch)
    history.append(float(metrics["loss"]))
  assert history[-1] < history[0] - 0.05, history


_MINKOWSKI = np.diag([-1.0] + [1.0] * 5)
_SYMPLECTIC = np.block([[np.zeros((3, 3)), np.eye(3)], [-np.eye(3), np.zeros((3, 3))]])


@pytest.mark.parametrize("overrides, want_total", [
    ({}, lambda z, c: np_info_nce(z["x1"], z["x2"], c.temperature)[0]
     + c.equiv_weight * np_equivariance(z["e1"], z["e2"], c.equiv_splits)),
    ({"objective": "simclr"}, lambda z, c: np_info_nce(z["x1"], z["x2"], c.temperature)[0]),
    ({"equiv_weight": 0.0}, lambda z, c: np_info_nce(z["x1"], z["x2"], c.temperature)[0]),
    # L_unif over all 2B per-image embeddings, no invariance term.
    ({"objective": "equi_unif"}, lambda z, c: np_wang_isola(np.concatenate([z["x1"], z["x2"]]), c.temperature)
     + c.equiv_weight * np_equivariance(z["e1"], z["e2"], c.equiv_splits)),
    ({"geometry": "symplectic"}, lambda z, c: np_info_nce(z["x1"], z["x2"], c.temperature)[0]
     + c.equiv_weight * np_equivariance(z["e1"], z["e2"], c.equiv_splits, _SYMPLECTIC)),
    ({"geometry": "hyperboloid"}, lambda z, c: np_hyperbolic_info_nce(z["x1"], z["x2"], c.temperature)
     + c.equiv_weight * np_equivariance(z["e1"], z["e2"], c.equiv_splits, _MINKOWSKI)),
], ids=["care", "simclr", "weight_0", "equi_unif", "symplectic", "hyperboloid"])
def test_each_objective_is_its_formula_of_the_four_views(overrides, want_total):
  config = _tiny_config(**{"equiv_weight": 0.7, "equiv_splits": 2, "temperature": 0.4, **overrides})
  rng = np.random.default_rng(3)
  z = {v: rng.normal(size=(8, 6)) for v in train.VIEWS}
  if config.geometry == "hyperboloid":  # points on the upper sheet, <z, z>_J = -1
    z = {v: np.concatenate([np.sqrt(1.0 + np.sum(x[:, 1:] ** 2, axis=1, keepdims=True)), x[:, 1:]], axis=1)
         for v, x in z.items()}
  else:
    z = {v: x / np.linalg.norm(x, axis=1, keepdims=True) for v, x in z.items()}
  with jax.default_matmul_precision("float32"):
    total, terms = train.objective(config, {v: jnp.asarray(x, jnp.float32) for v, x in z.items()})
  np.testing.assert_allclose(float(total), want_total(z, config), rtol=2e-5)
  assert np.isfinite(float(terms["info_nce"]))


def test_device_augmentation_draws_new_views_each_step_and_the_same_ones_again_on_a_rerun():
  config = _tiny_config(augment_backend="device")
  aug = augment_config.from_config(config)
  step = jax.jit(train.with_device_augmentation(lambda state, views: views, config, aug))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (config.batch_size, 16, 16, 3), np.uint8))
  state = lambda seed, at: train.TrainState(step=jnp.int32(at), params={}, batch_stats={}, opt_state=(),
                                            rng=jax.random.PRNGKey(seed))
  views = lambda seed, at: jax.device_get(step(state(seed, at), {"images": images}))
  first, again, next_step, other_seed = views(0, 5), views(0, 5), views(0, 6), views(1, 5)
  for v in train.VIEWS:
    np.testing.assert_array_equal(again[v], first[v])  # a resumed step redraws its views
    assert np.abs(next_step[v] - first[v]).mean() > 0.1, v  # the next step draws new ones
    assert np.abs(other_seed[v] - first[v]).mean() > 0.1, v  # so does another seed


def test_simclr_skips_the_equivariance_views():
  config = _tiny_config(objective="simclr", equiv_weight=0.0)
  batch = {k: v for k, v in _batch(config).items() if k in ("x1", "x2")}  # no e1/e2 at all
  _, metrics = _run(config, jax.devices(), batch)
  assert metrics["equivariance"] == 0.0
  np.testing.assert_allclose(metrics["loss"], metrics["info_nce"], rtol=1e-6)


def test_non_finite_loss_leaves_the_state_unchanged_and_is_flagged():
  config = _tiny_config(temperature=1e-30)  # logits overflow to inf -> NaN loss
  state0, step, to_global = _setup(config, jax.devices())
  before = jax.device_get(state0.params)
  state, metrics = step(state0, {k: to_global(v) for k, v in _batch(config).items()})
  assert not bool(metrics["finite"])
  _assert_trees_close(jax.device_get(state.params), before, rtol=0, atol=0)
  with pytest.raises(train.TrainingDivergedError, match="NaN/inf.*last good checkpoint: step 7"):
    train._check_finite(3, metrics, 7)


def test_weight_decay_skips_batchnorm_and_biases():
  config = _tiny_config()
  state, _, _ = _setup(config, jax.devices()[:1])
  mask = train.decay_mask(jax.device_get(state.params))
  flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert all(v for k, v in flat.items() if k.endswith("kernel"))
  assert not any(v for k, v in flat.items() if k.endswith(("scale", "bias")))


def test_warmup_then_cosine_schedule_values():
  config = _tiny_config(schedule="cosine", learning_rate=0.4, warmup_epochs=1.0, num_train_steps=0, num_epochs=5.0)
  durations = config_lib.resolve_durations(config, 10 * config.batch_size)  # 10 steps per epoch
  assert (durations.steps_per_epoch, durations.total_steps, durations.warmup_steps) == (10, 50, 10)
  lr = train.learning_rate_schedule(config, durations)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(30), lr(50)],
                             [0.0, 0.2, 0.4, 0.4 * 0.5 * (1 + np.cos(np.pi * 0.5)), 0.0], atol=1e-6)
  const = train.learning_rate_schedule(_tiny_config(learning_rate=0.1), config_lib.resolve_durations(
      _tiny_config(learning_rate=0.1), 320))
  assert float(const(0)) == pytest.approx(0.1) and float(const(9)) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["adam", "sgd", "lars"])
def test_each_optimizer_takes_a_finite_step(name):
  # Adam and SGD as other tests here configure them, so their steps come from the compilation cache.
  config = {"adam": _tiny_config(learning_rate=3e-3), "sgd": _one_step_sgd_config(),
            "lars": _tiny_config(optimizer="lars", learning_rate=0.1)}[name]
  state, metrics = _run(config, jax.devices(), _batch(config))
  assert bool(metrics["finite"]) and int(state.step) == 1


def test_lars_matches_optax_reference_on_one_step():
  config = _tiny_config(optimizer="lars", learning_rate=0.1, weight_decay=1e-4)
  tx = train.make_optimizer(config, optax.constant_schedule(0.1))
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
  grads = {"w": jnp.full((3, 3), 0.5), "b": jnp.full((3,), 0.5)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # LARS (You et al.): trust ratio eta ||w|| / ||g + wd w||, eta = 0.001 as in
  # SimCLR, on kernels only; biases get plain momentum SGD without decay.
  w_norm, g_norm = 3.0, np.linalg.norm(np.full((3, 3), 0.5 + 1e-4))
  np.testing.assert_allclose(updates["w"], -0.1 * 0.001 * (w_norm / g_norm) * (0.5 + 1e-4), rtol=1e-5)
  np.testing.assert_allclose(updates["b"], -0.1 * 0.5, rtol=1e-5)


def _flops(compiled) -> float:
  """Per-device FLOPs of a compiled step, as the train-step benchmark reads them."""
  from experiments import bench_train_step
  return float(bench_train_step.compiled_cost(compiled)["flops"])


def test_batched_views_equal_sequential_passes_including_batchnorm_statistics():
  # The config of test_one_and_eight_devices_...[care]: its batched 8-device
  # step is this test's too (one compilation, shared through the cache).
  config = _one_step_sgd_config(view_batching="sequential")
  batch = _batch(config, seed=4)
  state0 = jax.device_get(_setup(config, jax.devices()[:1])[0])
  seq_programs, batched_programs = {}, {}
  seq, m_seq = _run(config, jax.devices(), batch, programs=seq_programs)
  config.view_batching = "batched"
  batched, m_batched = _run(config, jax.devices(), batch, programs=batched_programs)
  for key in ("loss", "info_nce", "equivariance", "grad_norm"):
    np.testing.assert_allclose(m_batched[key], m_seq[key], rtol=5e-5)
  _assert_same_updates(batched.params, seq.params, state0.params)
  _assert_same_updates(batched.batch_stats, seq.batch_stats, state0.batch_stats)
  # Both are data-parallel: the batched step does an eighth of the 1-device
  # work per device (test_one_and_eight_devices_...), and the sequential step
  # as much as it (a replicated step would do 8x).
  ratio = _flops(seq_programs["step"]) / _flops(batched_programs["step"])
  assert 0.8 < ratio < 1.25, ratio


def test_compiled_step_takes_a_state_in_any_layout_and_keeps_its_own():
  # XLA picks the state's layouts (Layout.AUTO; on a GPU conv kernels become
  # output-channel-major). A state arriving in another layout, e.g. one a GPU
  # step left or a checkpoint gave, is moved into the step's layouts, and the
  # step returns it in them, so the loop relayouts at most once.
  from jax.experimental.layout import Format, Layout

  config = _one_step_sgd_config()  # its 1-device step is test_one_and_eight_devices_...[care]'s
  batch = _batch(config, seed=2)
  expected, _ = _run(config, jax.devices()[:1], batch)
  mesh = train.make_mesh(jax.devices()[:1])
  model = train.build_model(config)
  schedule = train.learning_rate_schedule(config, config_lib.resolve_durations(config, 10 * config.batch_size))
  tx = train.make_optimizer(config, schedule)
  state, to_global = train.create_train_state(model, tx, config, mesh), train.global_batch_builder(mesh)
  path = ("backbone", "stem_conv", "kernel")
  kernel = state.params[path[0]][path[1]][path[2]]
  o_major = jax.device_put(kernel, Format(Layout(major_to_minor=(3, 0, 1, 2)), kernel.sharding))
  assert o_major.format.layout != kernel.format.layout
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: o_major if tuple(k.key for k in p) == path else a, state.params)
  global_batch = {k: to_global(v) for k, v in batch.items()}
  compiled, placed = train.compile_train_step(train.make_train_step(model, tx, config, schedule), mesh,
                                              state.replace(params=params), global_batch)
  wanted = jax.tree.leaves(compiled.input_formats[0][0])
  assert [a.format.layout for a in jax.tree.leaves(placed)] == [f.layout for f in wanted]
  new_state, metrics = compiled(placed, global_batch)
  assert [a.format.layout for a in jax.tree.leaves(new_state)] == [f.layout for f in wanted]
  assert bool(metrics["finite"])
  _assert_trees_close(jax.device_get(new_state.params), expected.params, rtol=1e-6, atol=1e-7)


def test_device_feed_covers_each_epoch_once_resumes_exactly_and_moves_no_data_implicitly():
  # Image i is filled with the value i, so a batch names the rows it holds.
  n, batch_size = 50, 8
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3)).copy()
  mesh = train.make_mesh(jax.devices())
  steps_per_epoch = n // batch_size  # 6: the last 2 rows of each epoch's order are dropped
  feed = train.DeviceFeed(images, mesh, seed=3, global_batch=batch_size, steps_per_epoch=steps_per_epoch)
  # The training loop fetches batches under this guard: a Python number or
  # NumPy array reaching a jitted call per step would raise here.
  with jax.transfer_guard("disallow"):
    batches = [feed.batch(step)["images"] for step in range(3 * steps_per_epoch)]
  for b in batches:
    assert b.shape == (batch_size, 2, 2, 3) and b.dtype == np.uint8
    assert b.sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(b.addressable_shards) == 8 and all(s.data.shape[0] == 1 for s in b.addressable_shards)
  rows = np.stack([np.asarray(b)[:, 0, 0, 0] for b in batches]).reshape(3, steps_per_epoch * batch_size)
  assert np.all((np.asarray(batches[0]) == np.asarray(batches[0])[:, :1, :1, :1]))  # whole images, not mixed rows
  for epoch in rows:
    assert len(set(epoch.tolist())) == steps_per_epoch * batch_size  # no image twice within an epoch
  assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])  # reshuffled each epoch
  # Batches depend on the step alone: a fresh feed (a resumed run) picks up mid-epoch exactly.
  resumed = train.DeviceFeed(images, mesh, seed=3, global_batch=batch_size, steps_per_epoch=steps_per_epoch)
  for step in (8, 9, 12):
    np.testing.assert_array_equal(np.asarray(resumed.batch(step)["images"]), np.asarray(batches[step]))
  other_seed = train.DeviceFeed(images, mesh, seed=4, global_batch=batch_size, steps_per_epoch=steps_per_epoch)
  assert not np.array_equal(np.asarray(other_seed.batch(0)["images"]), np.asarray(batches[0]))
