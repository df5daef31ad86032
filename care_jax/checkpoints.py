"""Train-state checkpoints in workdir/checkpoints through orbax's CheckpointManager.

Saves are asynchronous (orbax writes in the background and renames a finished
temporary directory into place, so a process killed mid-save leaves the
previous checkpoints intact; leftover temporary directories are deleted when the
manager opens). Restoring walks back from the newest step: an unreadable
checkpoint is reported, moved aside to workdir/checkpoints_unreadable/<step>
(<step>.1, ... beside an earlier copy; never deleted) and the one before it is
used. Paths go through etils.epath, so gs:// work directories behave like local
ones.

Arrays are written by one replica unless they are large: orbax's default on CPU
and TPU splits every replicated array across its R replicas with one eager
slice per (shape, replica), and each slice is a small XLA compile. For this
project's models that cost ~3 s per process on 8 CPU devices against 0.35 s
for the whole write; splitting only pays when a slice is megabytes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import sys
from typing import Any, Callable, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath


# orbax's words when the saved tree and the requested one differ in structure.
_STRUCTURE_MISMATCH = "tree structures do not match"
# Replica-parallel writes only for slices at least this large (see the module docstring).
REPLICA_PARALLEL_MIN_SLICE_BYTES = 8 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """orbax's default handlers, with jax.Array split across replicas only for big slices."""
  handlers = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()
              if ty is not jax.Array]
  # The metadata store orbax's own default jax.Array handler writes (not exported
  # publicly): the files on disk stay exactly what StandardSave writes.
  from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
      array_metadata_store=array_metadata_store.Store())
  return ocp.type_handlers.create_type_handler_registry(*handlers, (jax.Array, arrays))


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be read."""


def _shapes(tree) -> dict:
  """'params/backbone/Conv_0/kernel' -> shape (None where a leaf has none), for a train
  state or orbax's metadata of one (attribute, key and index paths alike)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(map(name, path)): (tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# The OS errors that fail a checkpoint write for want of room or rights; orbax quotes
# them inside messages that run to several paths.
_WRITE_ERRORS = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES))


def _os_words(text: str) -> Optional[str]:
  return next((w for w in _WRITE_ERRORS if w in text), None)


def _reason(e: Exception) -> str:
  """An exception in a few words: the OS's, where orbax quotes them, else its first line,
  else its type."""
  text = str(e).strip()
  return _os_words(text) or (text.splitlines()[0][:200] if text else type(e).__name__)


class _BackgroundWriteFailures(logging.Filter):
  """Drops orbax's log records of a background write that failed on an OS error.

  One full disk makes orbax log five tracebacks from its save threads, each a page
  long, and then raise the same error in the main thread, where Checkpointer._writes
  turns it into one line naming the error and the step a rerun resumes from. Any other
  record passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return _os_words(f"{record.getMessage()} {error or ''}") is None


def _is_late_callback_into_closed_loop(unraisable) -> bool:
  """After a failed background write orbax closes the save thread's event loop while
  tensorstore still holds callbacks into it: each one (twenty for one full disk) is
  reported as an unraisable 'Event loop is closed' with no object, and means nothing more."""
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed")


_quieted = False


def _quiet_background_write_failures() -> None:
  """Installs the two filters above once per process (they pass everything else through)."""
  global _quieted
  if _quieted:
    return
  _quieted = True
  logging.getLogger("absl").addFilter(_BackgroundWriteFailures())
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if _is_late_callback_into_closed_loop(u) else previous(u)


@contextlib.contextmanager
def _absl_level(level: int):
  """absl's Python logger (orbax logs through it) at `level` for the block."""
  logger = logging.getLogger("absl")
  previous = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(previous)


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of `state`: what restore fills in."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:

  def __init__(self, directory, keep: int, *, async_save: bool = True, read_only: bool = False,
               log: Callable[[str], None] = print):
    """read_only: for evaluating a run that may still be training (touches nothing)."""
    self.directory = epath.Path(directory)
    self._keep = keep
    self._async = async_save
    self._read_only = read_only
    self._log = log
    if not read_only:
      _quiet_background_write_failures()
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    read_only = self._read_only
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else self._keep,
                                           save_interval_steps=0 if read_only else 1, create=not read_only,
                                           cleanup_tmp_directories=not read_only, read_only=read_only,
                                           enable_async_checkpointing=self._async)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
    # orbax warns that a read-only directory is read only: asked for, so not news.
    with _absl_level(logging.ERROR) if read_only else contextlib.nullcontext():
      return ocp.CheckpointManager(self.directory, options=options, item_handlers=handler)

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step` (returns before the write ends when async)."""
    if step in self._manager.all_steps():
      return  # Already saved (e.g. the final step equals a periodic one).
    with self._writes():  # an earlier asynchronous save's failure surfaces here too
      self._manager.save(int(step), args=ocp.args.PyTreeSave(state), force=True)

  @contextlib.contextmanager
  def _writes(self):
    """A failed write (a full disk, lost permissions) is one line naming what survives:
    orbax finishes a step's directory only after its last byte, so the saved steps
    are whole and a rerun resumes from the newest."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - orbax reports write failures as many types.
      saved = self._manager.all_steps()
      raise CheckpointError(
          f"could not write a checkpoint in {self.directory} ({_reason(e)}); free space there or pass another "
          f"--workdir, then rerun: it resumes from {'step %d' % max(saved) if saved else 'the start'}") from None

  def restore_latest(self, like, at_most: Optional[int] = None) -> Tuple[Any, Optional[int]]:
    """(state, step) from the newest readable checkpoint (<= at_most), or (None, None) if none exist."""
    steps = [s for s in self.all_steps() if at_most is None or s <= at_most]
    abstract = abstract_like(like)
    restore = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    wanted = _shapes(like)
    for step in reversed(steps):
      # Readable, but not this config's train state (another width, say): not damage,
      # so nothing may be moved aside. The saved shapes tell before any array is read.
      difference = self._difference_from(step, wanted)
      if difference:
        raise self._different_state(step, difference)
      try:
        state = self._manager.restore(step, args=restore)
        return state, step
      except Exception as e:  # noqa: BLE001 - any unreadable file means: use the previous one.
        reason = _reason(e)
        if _STRUCTURE_MISMATCH in str(e):
          raise self._different_state(step, "another tree of arrays") from None
        if self._read_only:
          self._log(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {reason}); trying the previous one")
          continue
        aside = self._set_aside(step)
        self._log(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {reason}); "
                  f"moved it to {aside} and trying the previous one")
    if steps:
      raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {steps}); "
                            f"move the directory away to start afresh")
    return None, None

  def _difference_from(self, step: int, wanted: dict) -> Optional[str]:
    """The first array whose saved path or shape differs from `wanted` (_shapes of the
    state to restore); None if all agree or the metadata cannot be read (then the
    restore itself decides)."""
    try:
      saved = _shapes(self._manager.item_metadata(step))
    except Exception:  # noqa: BLE001 - damaged metadata is for the restore to report.
      return None
    for path in sorted(set(saved) | set(wanted)):
      if path not in wanted:
        return f"{path}: saved, but not in this config's state"
      if path not in saved:
        return f"{path}: in this config's state, but not saved"
      if None not in (saved[path], wanted[path]) and saved[path] != wanted[path]:
        return f"{path}: saved with shape {saved[path]}, this config's is {wanted[path]}"
    return None

  def _different_state(self, step: int, difference: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint at step {step} in {self.directory} holds a different train state than this config builds "
        f"({difference}: another objective, model, width, optimiser or geometry?); resume with the config the "
        "run was started with (its workdir/config.json) or pass a new --workdir")

  def _aside_dir(self) -> epath.Path:
    return self.directory.parent / "checkpoints_unreadable"

  def _aside_path(self, step: int) -> epath.Path:
    """checkpoints_unreadable/<step>, or <step>.1, .2, ... beside an earlier run's copy
    of that step (set aside, never deleted)."""
    aside = self._aside_dir()
    candidates = (aside / (str(step) + (f".{n}" if n else "")) for n in itertools.count())
    return next(path for path in candidates if not path.exists())

  def _set_aside(self, step: int) -> epath.Path:
    """Moves step's directory into checkpoints_unreadable; returns where it went."""
    from jax.experimental import multihost_utils  # noqa: PLC0415
    sync = (lambda name: multihost_utils.sync_global_devices(f"care_jax_checkpoint_aside_{step}_{name}")
            if jax.process_count() > 1 else None)
    target = self._aside_path(step)  # named by every process before process 0 moves anything
    sync("named")
    if jax.process_index() == 0:
      self._aside_dir().mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    sync("moved")
    self._manager.close()
    self._manager = self._open()
    return target

  def wait(self) -> None:
    with self._writes():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      if not self._read_only:
        self.wait()
    finally:
      self._manager.close()
