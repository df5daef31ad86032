"""CARE pretraining: the train state, the sharded train step and the training loop.

One `Mesh(all devices, ('data',))`; the global batch is sharded along 'data',
the state is replicated, and `train_step` is one jax.jit-compiled program with
the state donated. Because the step is written for the whole global batch, XLA
inserts the communication: InfoNCE negatives and BatchNorm statistics are global,
so 1 device and N devices compute the same loss, gradients and updates.
Equivariance chunks never straddle devices (config_lib checks that chunk size
divides the per-device batch), so the L_equi term needs no communication.

This module imports no TensorFlow: `train_and_evaluate` imports the input
pipeline only when the config needs tf.data (augment_backend='tf', streamed
ImageNet, tfds or folder sources). With augment_backend='device' on
fashion_mnist or npz data a run, its final report included, is TF-free.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from care_jax import augment_jax, checkpoints, config_lib, datasets, evaluate, losses, metric_writers, moco
from care_jax.models import resnet

VIEWS = ("x1", "x2", "e1", "e2")


class TrainingDivergedError(RuntimeError):
  """The loss or a gradient became NaN/inf; the message says what to change."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; per-step keys are fold_in(rng, step).


@flax.struct.dataclass
class MocoTrainState(TrainState):
  """objective moco / moco_care: plus the key encoder and the queue (care_jax.moco).

  A subclass, not an optional field, so the other objectives' checkpoints keep
  the structure they always had (older runs stay resumable).
  """
  moco: Any = None


# ------------------------------------------------------------------ pieces

def build_model(config) -> resnet.ContrastiveModel:
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  return resnet.build_model(config.model, config.model_stem, config.model_width, dtype,
                            config.proj_hidden_dim, config.proj_dim, config.geometry, config.proj_head,
                            config.bn_groups)


def learning_rate_schedule(config, durations: config_lib.Durations) -> optax.Schedule:
  """Linear warm-up from 0, then constant or cosine decay to 0 at the last step."""
  lr, warmup, total = config.learning_rate, durations.warmup_steps, max(1, durations.total_steps)
  if config.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  else:
    after = optax.constant_schedule(lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params):
  """Weight decay on kernels only: BatchNorm scales/biases and dense biases are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam and SGD add the decay to the gradient (torch's weight_decay); LARS as in optax."""
  wd = config.weight_decay
  if config.optimizer == "lars":
    return optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask,
                      trust_ratio_mask=decay_mask, momentum=config.momentum)
  if config.optimizer == "adam":
    direction = optax.scale_by_adam()
  else:  # sgd with (torch-style) momentum
    direction = optax.trace(decay=config.momentum)
  return optax.chain(optax.add_decayed_weights(wd, decay_mask), direction, optax.scale_by_learning_rate(schedule))


def create_train_state(model, tx, config, mesh: Mesh) -> TrainState:
  """Initialises the replicated state with one jitted call (no host round trip)."""
  replicated = NamedSharding(mesh, P())

  def init(seed):
    rng = jax.random.PRNGKey(seed)
    images = jnp.zeros((2, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init(jax.random.fold_in(rng, 0), images, train=False)
    params = variables["params"]
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                  opt_state=tx.init(params), rng=rng)
    if config.objective in config_lib.MOCO_OBJECTIVES:
      return MocoTrainState(**fields, moco=moco.init_state(params, variables["batch_stats"],
                                                           jax.random.fold_in(rng, 1), int(config.moco_queue_size),
                                                           int(config.proj_dim)))
    return TrainState(**fields)

  return jax.jit(init, out_shardings=replicated, static_argnums=0)(int(config.seed))


def objective(config, z) -> tuple:
  """The configured loss of the projections z[view] -> (total, terms for logging)."""
  if config.objective == "equi_unif":
    unif = losses.wang_isola_uniformity(jnp.concatenate([z["x1"], z["x2"]]), config.temperature)
    equi = losses.equivariance_loss(z["e1"], z["e2"], config.equiv_splits)
    total = unif + config.equiv_weight * equi
    return total, dict(uniformity=unif, equivariance=equi, info_nce=losses.info_nce(z["x1"], z["x2"],
                                                                                        config.temperature))
  use_equi = config_lib.uses_equivariance(config)
  weight = config.equiv_weight if use_equi else 0.0
  if config.geometry == "hyperboloid":
    nce = losses.hyperbolic_info_nce(z["x1"], z["x2"], config.temperature)
    equi = (losses.equivariance_loss(z["e1"], z["e2"], config.equiv_splits, "minkowski") if use_equi
            else jnp.zeros((), jnp.float32))
    return nce + weight * equi, dict(info_nce=nce, equivariance=equi)
  return losses.care_loss(z["x1"], z["x2"], z.get("e1"), z.get("e2"), temperature=config.temperature,
                          equiv_weight=weight, num_chunks=config.equiv_splits,
                          form=config_lib.EQUIVARIANCE_FORMS[config.geometry])


def _finish_step(state: TrainState, loss, terms, grads, params, batch_stats, opt_state, moco_state, z1, schedule):
  """The tail every step kind shares: the NaN/inf guard and the logged metrics."""
  with jax.named_scope("guard_and_metrics"):
    # A bad step changes nothing (the host then stops the run).
    # One test of the gradients: their global norm (a metric anyway) is finite
    # iff every entry is, short of a norm past 1.8e19 (its float32 sum of
    # squares overflows), itself a divergence. A finiteness reduction per leaf
    # cost 45 more kernels a step on a GPU (experiments/gpu_aot_profile.py,
    # ResNet-18 B=512 bf16 for an H200: 1508 -> 1463 launches).
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              batch_stats=keep(batch_stats, state.batch_stats),
                              opt_state=keep(opt_state, state.opt_state))
    if moco_state is not None:
      new_state = new_state.replace(moco=keep(moco_state, state.moco))
    metrics = dict(loss=loss, **terms, learning_rate=schedule(state.step),
                   grad_norm=grad_norm, param_norm=optax.tree.norm(state.params),
                   # Collapse signal: per-dimension std of the embeddings
                   # (0 = collapsed; 1/sqrt(D) for uniformly spread unit vectors).
                   embedding_std=jnp.mean(jnp.std(z1, axis=0)), finite=finite)
    return new_state, metrics


def _views_in_one_pass(model, params, batch_stats, batch, views):
  """The views' forward passes as ONE model call (bigger kernels, a quarter of the launches).

  The views are interleaved along the batch, row i V + v holding view v of
  image i, so a device's rows of the batch are its own images' views and the
  call stays data-parallel. (Stacking them view after view, or vmapping over a
  view axis, whose convolutions fold that axis in as the batch's major part,
  gives rows no device holds contiguously: XLA then gathered the whole batch
  onto every device and ran the step replicated, as much work per device on
  8 devices as on 1.) The model's `views` argument gives every view its own
  BatchNorm statistics and leaves the running averages as the sequential
  passes do, so loss, gradients and state equal theirs.
  """
  count = len(views)
  interleaved = jnp.stack([batch[v] for v in views], axis=1)  # [B, V, H, W, C]
  images = interleaved.reshape((-1,) + interleaved.shape[2:])
  (_, z), updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                views=count, mutable=["batch_stats"])
  z = z.reshape((-1, count) + z.shape[1:])
  return {v: z[:, i] for i, v in enumerate(views)}, updates["batch_stats"]


def make_train_step(model, tx, config, schedule: optax.Schedule) -> Callable:
  """train_step(state, batch) -> (state, metrics), pure; batch holds views x1, x2 (e1, e2)."""
  finish = lambda *args: _finish_step(*args, schedule)
  if config.objective in config_lib.MOCO_OBJECTIVES:
    return moco.make_train_step(model, tx, config, schedule, finish)
  views = VIEWS if config_lib.uses_equivariance(config) else VIEWS[:2]

  def loss_fn(params, batch_stats, batch):
    z = {}
    if config.view_batching == "batched":
      # One pass over all four views, or two where e1, e2 hold fewer images
      # (equiv_batch_size): x1, x2, then e1, e2, the sequential passes' order.
      same_size = len({batch[v].shape[0] for v in views}) == 1
      for group in [views] if same_size else [views[:2], views[2:]]:
        z_group, batch_stats = _views_in_one_pass(model, params, batch_stats, batch, group)
        z.update(z_group)
    else:
      # One forward pass per view, as the release does: BatchNorm normalises each
      # view with that view's statistics, and the running averages are updated
      # once per view, in order.
      for view in views:
        (_, z[view]), updates = model.apply({"params": params, "batch_stats": batch_stats}, batch[view],
                                            train=True, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
    with jax.named_scope("loss"):
      total, terms = objective(config, z)
    return total, (terms, batch_stats, z["x1"])

  def train_step(state: TrainState, batch):
    (loss, (terms, batch_stats, z1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    return finish(state, loss, terms, grads, params, batch_stats, opt_state, None, z1)

  return train_step


def with_device_augmentation(train_step, config, aug) -> Callable:
  """step(state, {"images": uint8 [B, H, W, 3]}): the views are made inside the compiled step.

  Keys fold (rng, step) like every other per-step draw, so a resumed run
  redraws exactly the views it would have seen.
  """
  with_equivariance = config_lib.uses_equivariance(config)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _AUGMENT_STREAM), state.step)
    with jax.named_scope("augment"):
      views = augment_jax.pretraining_views(batch["images"], key, aug, num_chunks=config.equiv_splits,
                                            equiv_batch=config_lib.equiv_batch(config),
                                            num_pairs=config_lib.equiv_pairs(config),
                                            with_equivariance=with_equivariance)
    return train_step(state, views)

  return step


_AUGMENT_STREAM = 0x61756720  # separates the augmentation keys from the other uses of state.rng


class DeviceFeed:
  """The whole uint8 training set on the devices; each step's batch is gathered there.

  Per epoch one permutation drawn on the device from (seed, epoch); step s
  takes rows [(s mod E) B, (s mod E + 1) B) of it (E steps per epoch, the
  remainder dropped as in the tf.data pipeline), so batches depend on the
  step alone and a resumed run continues exactly. Only the batch's offset in
  the epoch's order crosses from the host per step, as an explicit 4-byte
  transfer: the training loop runs under jax.transfer_guard("disallow").
  """

  def __init__(self, images: np.ndarray, mesh: Mesh, seed: int, global_batch: int, steps_per_epoch: int):
    self._replicated = NamedSharding(mesh, P())
    self.images = jax.device_put(images, self._replicated)
    n, self._batch, self._steps_per_epoch = len(images), global_batch, steps_per_epoch
    key = jax.random.PRNGKey(seed)
    self._permutation = jax.jit(lambda epoch: jax.random.permutation(jax.random.fold_in(key, epoch), n))
    self._gather = jax.jit(
        lambda images, order, offset: jnp.take(images, jax.lax.dynamic_slice_in_dim(order, offset, global_batch),
                                               axis=0),
        out_shardings=NamedSharding(mesh, P("data")))
    self._epoch, self._order = None, None

  def batch(self, step: int) -> dict:
    epoch, index = divmod(int(step), self._steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._order = epoch, self._permutation(jax.device_put(np.int32(epoch), self._replicated))
    offset = jax.device_put(np.int32(index * self._batch), self._replicated)
    return {"images": self._gather(self.images, self._order, offset)}


def jit_train_step(train_step, mesh: Mesh):
  """train_step under jax.jit: state replicated and donated, batch sharded along 'data'.

  The state's device layouts are left to XLA (Layout.AUTO), and a step hands
  the state back in the layouts it took it in. On a GPU XLA keeps the conv
  kernels and their Adam moments output-channel-major, the layout cuDNN reads
  and writes filters in, instead of Flax's HWIO: no step transposes them, and
  the optimizer's update, no longer fused into the transpose of each kernel's
  gradient, writes in place. For ResNet-18 B=512 bf16 compiled for an H200
  (experiments/gpu_aot_profile.py) that took 64 copy kernels out of 1463
  launches to 4 out of 1379, and 93.6 to 92.8 MB/img. On CPUs the layouts XLA
  picks are the default ones. Lower it from shape_structs (lower_train_step), not arrays.
  """
  replicated = NamedSharding(mesh, P())
  state_format = Format(Layout.AUTO, replicated)
  return jax.jit(train_step, in_shardings=(state_format, NamedSharding(mesh, P("data"))),
                 out_shardings=(state_format, replicated), donate_argnums=0)


def shape_structs(tree):
  """Arrays -> jax.ShapeDtypeStructs with their shardings (what Layout.AUTO lowers from)."""
  return jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else
                      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def to_state_layouts(state, compiled):
  """The state in the device layouts the compiled step takes it in (unchanged where it already is)."""
  formats = compiled.input_formats[0][0]
  if all(a.format.layout == f.layout for a, f in zip(jax.tree.leaves(state), jax.tree.leaves(formats))):
    return state
  # A jitted copy, not device_put: it also relayouts arrays spread over several hosts.
  return jax.jit(lambda s: s, out_shardings=formats)(state)


def compile_train_step(train_step, mesh: Mesh, state, batch):
  """(step, state): train_step compiled once for these shapes, and the state placed for it.

  `batch` (arrays or shape_structs) fixes the batch's structure and shapes;
  the compiled step runs on those alone, never retracing. Keep using the
  state it returns: its layouts are the step's own (see jit_train_step).
  """
  compiled = lower_train_step(train_step, mesh, state, batch).compile()
  return compiled, to_state_layouts(state, compiled)


def lower_train_step(train_step, mesh: Mesh, state, batch):
  """jit_train_step lowered for the shapes of (state, batch), arrays or shape_structs.

  Under the mesh, so the step may place an intermediate by naming an axis
  (MoCo's shuffled keys: moco._split_by_rows).
  """
  with jax.set_mesh(mesh):
    return jit_train_step(train_step, mesh).lower(shape_structs(state), shape_structs(batch))


def make_embed_fn(model, mesh: Mesh):
  """embed(variables, images) -> (backbone features, projections), BatchNorm in inference mode."""
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P("data")))


def global_batch_builder(mesh: Mesh) -> Callable[[np.ndarray], jax.Array]:
  """Process-local rows -> one global array sharded along 'data': the batch's own, intended transfer."""
  sharding = NamedSharding(mesh, P("data"))

  def build(local):
    # With several processes jax builds the array through make_array_from_callback,
    # whose copies its transfer guard counts as implicit; the training loop's
    # guard (transfer_guard("disallow")) must let this one through.
    with jax.transfer_guard_host_to_device("allow"):
      return jax.make_array_from_process_local_data(sharding, np.asarray(local))

  return build


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize() when the config or the environment asks for it."""
  import os
  if not (config.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  kwargs = {}
  if config.coordinator_address:
    kwargs["coordinator_address"] = config.coordinator_address
  if config.num_processes:
    kwargs["num_processes"] = int(config.num_processes)
  if config.process_id >= 0:
    kwargs["process_id"] = int(config.process_id)
  jax.distributed.initialize(**kwargs)


# ------------------------------------------------------------------ the loop

class _StopFlag:
  """Set by SIGTERM (preemption) or a first Ctrl-C: the loop saves a checkpoint and
  returns. A second Ctrl-C interrupts at once, as Python's default does."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def install(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      print("stopping after this step with a checkpoint (Ctrl-C again to stop at once, losing the steps since the "
            "last checkpoint)", file=sys.stderr, flush=True)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      # JAX's preemption notifier catches SIGTERM on every host; all agree here.
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def uninstall(self):
    for sig, previous in self._previous.items():
      if previous is not None:  # None: a handler set outside Python, which cannot be put back
        signal.signal(sig, previous)


def _host_metrics(metrics) -> dict:
  return {k: (bool(v) if k == "finite" else float(v)) for k, v in jax.device_get(metrics).items()}


def load_pretraining_split(config) -> tuple:
  """(the pretraining split in memory, its images at source_image_size; its example count).
  A streamed dataset (ImageNet) is never read whole: (None, its count)."""
  if config.dataset in config_lib.STREAMING_DATASETS:
    from care_jax import input_pipeline  # noqa: PLC0415
    return None, input_pipeline.streaming_num_examples(config.dataset, config.train_split, config.data_dir or None,
                                                       config.download)
  data = datasets.load_dataset(config.dataset, config.train_split, config_lib.source_size(config),
                               config.data_dir or None, config.download)
  return data, len(data.images)


@contextlib.contextmanager
def _sole_run(workdir):
  """One training run per workdir at a time: a second one (a job launched twice, a
  restart while the old process lives) would interleave its checkpoints and logs with
  the first's. An flock held by process 0, so a killed run leaves no stale lock; local
  paths only (gs:// has no locks), and unguarded where the filesystem has none."""
  if jax.process_index() != 0 or "://" in str(workdir):
    yield
    return
  import fcntl  # noqa: PLC0415 (POSIX; the lock is this function's business)
  with open(os.path.join(str(workdir), ".lock"), "a+") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      raise config_lib.ConfigError(f"workdir={str(workdir)!r} is in use by another training run "
                                   f"({lock.read().strip() or 'its process is unknown'}); wait for it to end or "
                                   "pass another --workdir") from None
    except OSError:
      pass  # no locks on this filesystem
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    yield


def train_and_evaluate(config, workdir: str, *, stop_at_step: Optional[int] = None) -> dict:
  """Pretrains per `config` into `workdir`, resuming from its latest checkpoint.

  stop_at_step ends this invocation after that step with a checkpoint, as a
  preemption would (tests and time-sliced jobs). Returns a summary dict: the
  final report when final_eval ran, else {"step": ..., "status": ...}.
  """
  made_here = not epath.Path(workdir).exists()
  workdir = config_lib.check_workdir(workdir)
  try:
    with _sole_run(workdir):
      return _train_and_evaluate(config, workdir, stop_at_step)
  except BaseException:
    if made_here:  # a run refused before its first output (bad data, say) leaves no empty workdir behind
      _remove_if_unused(workdir)
    raise


def _remove_if_unused(workdir) -> None:
  """Deletes workdir if it holds nothing but _sole_run's lock file (process 0 only).
  Best effort: it runs while an error propagates, which it must never replace."""
  if jax.process_index() != 0:
    return
  try:
    if all(p.name == ".lock" for p in workdir.iterdir()):
      (workdir / ".lock").unlink(missing_ok=True)
      workdir.rmdir()
  except Exception:  # noqa: BLE001 (a filesystem that refuses leaves the folder, as before)
    pass


def _train_and_evaluate(config, workdir, stop_at_step: Optional[int]) -> dict:
  # TensorFlow stays out unless the config needs it: tf.data augmentation, a
  # streamed dataset, or a source that TF decodes (tfds names, image folders).
  mesh = make_mesh()
  config_lib.validate(config, jax.device_count())
  is_chief = jax.process_index() == 0

  streaming = config.dataset in config_lib.STREAMING_DATASETS
  train_data, num_train = load_pretraining_split(config)
  durations = config_lib.resolve_durations(config, num_train)

  model = build_model(config)
  schedule = learning_rate_schedule(config, durations)
  tx = make_optimizer(config, schedule)
  state = create_train_state(model, tx, config, mesh)
  writer = metric_writers.MetricWriter(workdir, durations.total_steps, enabled=is_chief)
  to_global = global_batch_builder(mesh)
  # Final-report features go to workdir/features for later evaluations of the checkpoint.
  evaluator = evaluate.RunEvaluator(config, model, mesh, log=writer.note, cache_dir=workdir / "features")
  if train_data is not None:
    evaluator.add_data(config.train_split, train_data)
  if config.final_eval or config.eval_every_steps:
    evaluator.check_splits()  # before the checkpoint and config.json are touched
  changes = _config_changes(workdir, config)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, log=writer.note)
  restored, start_step = ckpt.restore_latest(state)
  start_step = int(start_step or 0)
  finished = (_finished_report(workdir, config, start_step, durations.total_steps, writer.note) if changes == []
              else None)
  if finished is not None:
    ckpt.close()
    writer.note(f"already finished at step {start_step}: {workdir / 'report.json'}  {evaluate.summary_line(finished)}"
                " (python -m care_jax.evaluate re-evaluates it; another --workdir trains afresh)")
    writer.close()
    return finished
  if restored is not None:
    state = restored
    writer.note(f"resumed from {ckpt.directory / str(start_step)} (step {start_step})"
                + (f" with a changed config: {'; '.join(changes)}" if changes else ""))
  writer.truncate_after(start_step)
  if is_chief:
    metric_writers.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))

  views = VIEWS if config_lib.uses_equivariance(config) else VIEWS[:2]
  last_step = durations.total_steps if stop_at_step is None else min(stop_at_step, durations.total_steps)
  train_step = make_train_step(model, tx, config, schedule)
  if config.augment_backend == "device":
    feed = DeviceFeed(train_data.images, mesh, config.seed, config.batch_size, durations.steps_per_epoch)
    train_step = with_device_augmentation(train_step, config, evaluator.aug)
    next_batch = feed.batch
  else:
    from care_jax import input_pipeline  # noqa: PLC0415
    common = dict(seed=config.seed, global_batch=config.batch_size, num_chunks=config.equiv_splits,
                  aug=evaluator.aug, start_step=start_step, num_steps=max(0, last_step - start_step),
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  equiv_batch=config_lib.equiv_batch(config), equiv_pairs=config_lib.equiv_pairs(config),
                  with_equivariance=len(views) == 4)
    if streaming:
      batches = input_pipeline.streaming_pretraining_dataset(
          config.dataset, config.train_split, data_dir=config.data_dir or None, download=config.download, **common)
    else:
      batches = input_pipeline.pretraining_dataset(train_data, **common)
    batches = batches.as_numpy_iterator()

    def next_batch(step):
      local = next(batches)
      return {v: to_global(local[v]) for v in views}
  # The first batch fixes the shapes the step is compiled for; each next batch
  # is fetched while the device runs the step before it.
  if start_step < last_step:
    batch = next_batch(start_step)
    p_train_step, state = compile_train_step(train_step, mesh, state, batch)

  stop = _StopFlag().install()
  status = "finished"
  pending = None  # (step, metrics) of the step in flight, checked one step late.
  window_start, window_steps = None, 0
  last_good_save = ckpt.latest_step()
  try:
    step = start_step
    while step < last_step:
      # Dispatching a step and fetching the next batch may move data only by
      # explicit transfers (the batch's own); an implicit one here, say a NumPy
      # array or Python number reaching a jitted call, would be a silent host
      # round trip every step, so it raises instead.
      with jax.transfer_guard("disallow"):
        state, metrics = p_train_step(state, batch)
        step += 1
        batch = next_batch(step) if step < last_step else None
      window_steps += 1
      if pending is not None:
        _check_finite(*pending, last_good_save)
      pending = (step, metrics)
      if window_start is None:  # The first step includes compilation: time from after it.
        jax.block_until_ready(metrics)
        window_start, window_steps = time.perf_counter(), 0
      if step % config.log_every_steps == 0 or step == last_step:
        scalars = _host_metrics(metrics)
        _check_finite(step, scalars, last_good_save)
        elapsed = time.perf_counter() - window_start
        per_step = elapsed / max(1, window_steps)
        scalars.update(images_per_sec=config.batch_size / per_step if window_steps else 0.0, epoch=step /
                       durations.steps_per_epoch)
        writer.write(step, scalars)
        writer.progress(step, scalars["loss"], scalars["images_per_sec"], per_step)
        window_start, window_steps = time.perf_counter(), 0
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step != last_step:
        knn = evaluator.knn(variables_of(state), ("monitor", step), config.knn_monitor_examples)
        evaluator.forget(("monitor", step))
        writer.write(step, {"knn_top1": knn["top1"], "knn_top5": knn["top5"]})
        writer.note(f"step {step}: kNN top-1 {knn['top1']:.2f}% (k={knn['k']}, T={knn['temperature']})")
        window_start, window_steps = time.perf_counter(), 0
      if step == last_step:
        break
      if stop.should_stop(step):
        status = "preempted"
        break
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        _check_finite(*pending, last_good_save)
        ckpt.save(step, state)
        last_good_save = step
    if pending is not None:
      _check_finite(*pending, last_good_save)
    if step > start_step or ckpt.latest_step() is None:
      ckpt.save(step, state)  # The final (or preempted) step is always saved.
    ckpt.wait()
  finally:
    stop.uninstall()
    ckpt.close()
    batches = next_batch = None  # training is over: release the input pipeline (threads, prefetched batches)

  if status == "preempted" or step < durations.total_steps:
    writer.note(f"stopped at step {step} with a checkpoint; rerun the same command to resume")
    writer.close()
    return {"step": step, "status": "preempted" if status == "preempted" else "stopped"}
  if not config.final_eval:
    writer.close()
    return {"step": step, "status": status}

  baseline = random_init_variables(model, config, mesh) if config.random_init_baseline else None
  report = evaluator.report(variables_of(state), step, baseline)
  report["step"] = step
  evaluate.write_report(workdir, report)
  # Wahba and gamma_f are None when wahba_trials=0.
  writer.write(step, {k: report[k] for k in ("knn_top1", "linear_probe_top1", "wahba_error_mean",
                                             "wahba_error_max", "relative_equivariance") if report[k] is not None})
  writer.note(f"report: {workdir / 'report.json'}  {evaluate.summary_line(report)}")
  writer.close()
  return report


def _config_changes(workdir, config) -> Optional[list]:
  """'field: saved -> now' for each field this config changes from the workdir's config.json
  (the previous run's); None where there is none. A resumed run says them: extending
  num_epochs is routine, another objective on a finished CARE run is likely a wrong --workdir."""
  saved = config_lib.saved_config(workdir, "restore it, or delete it to resume from the checkpoints under this config")
  if saved is None:
    return None
  return [f"{k}: {was!r} -> {now!r}" for k, was, now in config_lib.config_changes(saved, config)]


def _finished_report(workdir, config, step: int, total_steps: int, log: Callable[[str], None]) -> Optional[dict]:
  """The report of a run that already ended where this config ends: with the config unchanged
  (the caller checks), the same command run again (a second `make demo`) shows it instead of
  evaluating the same checkpoint again (minutes). None otherwise. One process only, where no
  other host could read a different workdir."""
  if jax.process_count() > 1 or step != total_steps or not config.final_eval:
    return None
  report = metric_writers.read_derived_json(workdir / "report.json", log, f"evaluating step {step} again")
  return report if report is not None and report.get("step") == step else None


def _check_finite(step: int, metrics: dict, last_good_save) -> None:
  """Raises TrainingDivergedError if the step's guard saw NaN/inf (metrics on device or host)."""
  if not bool(jax.device_get(metrics["finite"])):
    loss = float(jax.device_get(metrics["loss"]))
    where = f"step {last_good_save}" if last_good_save is not None else "none saved yet"
    raise TrainingDivergedError(
        f"step {step}: loss={loss} or the gradients are NaN/inf, so training stopped (that update was not applied); "
        f"last good checkpoint: {where}. Lower learning_rate or raise temperature, then rerun to resume")


def random_init_variables(model, config, mesh: Mesh) -> dict:
  """The untrained encoder's variables (the random-init baseline of the reports)."""
  return variables_of(create_train_state(model, optax.identity(), config, mesh))


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _subset(data, n: int):
  if n >= len(data.images):
    return data
  return type(data)(data.images[:n], data.labels[:n], data.num_classes)
