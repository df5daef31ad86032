"""checkpoints.Checkpointer: round trip on 8 devices, and files orbax's own StandardCheckpointer reads."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from care_jax import checkpoints


def _replicated_state(big_rows: int):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rep = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  tree = {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32), "step": np.int32(7),
          "big": rng.normal(size=(big_rows, 256)).astype(np.float32)}
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), tree)


def test_save_restore_keeps_values_and_shardings_and_orbax_reads_the_files(tmp_path, monkeypatch):
  # Small leaves (one replica writes them) and one above the replica-parallel
  # threshold, lowered for the test: 8 replicas write a 4 KiB slice each.
  monkeypatch.setattr(checkpoints, "REPLICA_PARALLEL_MIN_SLICE_BYTES", 4096)
  state = _replicated_state(big_rows=4 * jax.device_count())
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2)
  ckpt.save(3, state)
  ckpt.wait()
  restored, step = ckpt.restore_latest(state)
  ckpt.close()
  assert step == 3
  for key in state:
    np.testing.assert_array_equal(restored[key], state[key])
    assert restored[key].sharding == state[key].sharding
  # The on-disk format is orbax's standard PyTree one.
  plain = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "default",
                                             checkpoints.abstract_like(state))
  for key in state:
    np.testing.assert_array_equal(plain[key], state[key])


def test_a_failed_write_is_one_line_naming_the_os_error_and_the_step_a_rerun_resumes_from(tmp_path):
  # orbax's words when a disk fills mid-save (seen on a 600 KiB tmpfs); the save of
  # step 3 finished before it, so that is where a rerun starts.
  import pytest  # noqa: PLC0415
  state = _replicated_state(big_rows=8)
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2)
  ckpt.save(3, state)
  ckpt.wait()
  full = ValueError('RESOURCE_EXHAUSTED: Error writing local file "checkpoints/5.orbax-checkpoint-tmp/_sharding": '
                    "Failed to write 18221 bytes to file 9: No space left on device [os_error_code='28']")

  def fail(*args, **kwargs):
    raise full

  for call in ("save", "wait_until_finished"):  # a save refused at once, or an asynchronous one failing later
    original = getattr(ckpt._manager, call)
    setattr(ckpt._manager, call, fail)
    with pytest.raises(checkpoints.CheckpointError) as err:
      ckpt.save(5, state) if call == "save" else ckpt.wait()
    assert str(err.value) == (f"could not write a checkpoint in {tmp_path / 'checkpoints'} (No space left on "
                              "device); free space there or pass another --workdir, then rerun: it resumes from step 3")
    setattr(ckpt._manager, call, original)
  ckpt.close()


# A checkpoint write that the OS refuses in orbax's background threads: here a
# per-file size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so write() fails with EFBIG),
# which fails the same tensorstore writes a full disk does, without a small mount.
_REFUSED_WRITE = """
import resource, signal, sys
import jax, jax.numpy as jnp
from care_jax import checkpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ckpt = checkpoints.Checkpointer(sys.argv[1], keep=2)
ckpt.save(1, {"small": jnp.ones(4), "big": jnp.ones((2, 512))})
ckpt.wait()
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
try:
  for step in (2, 3):  # the second save meets the first one's failure
    big = jax.random.normal(jax.random.key(step), (512, 512))  # 1 MiB that does not compress
    ckpt.save(step, {"small": jnp.ones(4), "big": big})
  ckpt.close()
except checkpoints.CheckpointError as e:
  print(f"error: {e}")
"""


def test_a_write_refused_in_the_background_is_the_one_line_error_and_no_orbax_tracebacks(tmp_path):
  import subprocess, sys  # noqa: E401, PLC0415
  env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  result = subprocess.run([sys.executable, "-c", _REFUSED_WRITE, str(tmp_path / "checkpoints")], env=env,
                          capture_output=True, text=True, timeout=120)
  output = result.stdout + result.stderr
  assert f"error: could not write a checkpoint in {tmp_path / 'checkpoints'} (File too large);" in result.stdout
  assert "it resumes from step 1" in result.stdout
  # orbax logs each failed save thread with a page of traceback (four here, five for a
  # full disk): the error above says it once.
  assert "Traceback" not in output and "OUT_OF_RANGE" not in output, output[-3000:]


# What orbax leaves after a failed write, made directly: a tensorstore future awaited
# on an event loop that is closed before the future completes. Its completion
# callback then fails in tensorstore's thread; Python reports that as unraisable.
_LATE_CALLBACK = """
import asyncio, sys
import tensorstore as ts
if sys.argv[1] != "-":
  from care_jax import checkpoints
  checkpoints.Checkpointer(sys.argv[1], keep=1).close()
promise, future = ts.Promise.new()
loop = asyncio.new_event_loop()
async def wait():
  await future
task = loop.create_task(wait())
loop.run_until_complete(asyncio.sleep(0.01))
loop.close()
promise.set_result(1)
class Unrelated:
  def __del__(self):
    raise RuntimeError("something else")
Unrelated()
"""


def test_only_late_callbacks_into_a_closed_event_loop_are_silenced(tmp_path):
  import subprocess, sys  # noqa: E401, PLC0415
  run = lambda workdir: subprocess.run([sys.executable, "-c", _LATE_CALLBACK, workdir],  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
  plain, quieted = run("-"), run(str(tmp_path / "checkpoints"))
  assert "RuntimeError: Event loop is closed" in plain.stderr  # the case is made as it happens
  assert "Event loop is closed" not in quieted.stderr, quieted.stderr
  assert "RuntimeError: something else" in quieted.stderr  # every other unraisable is still reported


def test_only_orbax_records_of_a_refused_write_are_dropped():
  import logging  # noqa: PLC0415
  keep = checkpoints._BackgroundWriteFailures().filter
  record = lambda path, message, level=logging.ERROR, error=None: logging.LogRecord(  # noqa: E731
      "absl", level, path, 1, message, None, (type(error), error, None) if error else None)
  orbax = "/site-packages/orbax/checkpoint/_src/futures/future.py"
  full = ValueError("RESOURCE_EXHAUSTED: ... Failed to write 9 bytes to file 4: No space left on device")
  assert not keep(record(orbax, "_SignalingThread.run() raised an exception", error=full))
  assert not keep(record(orbax, f"raised an exception: {full}"))
  assert keep(record(orbax, "_SignalingThread.run() raised an exception", error=ValueError("bad dtype")))
  assert keep(record(orbax, "No space left on device", level=logging.WARNING))
  assert keep(record("/site-packages/care_jax/train.py", "No space left on device"))


def test_a_read_only_checkpointer_opens_without_orbax_warnings_and_reads(tmp_path, caplog):
  # The evaluation CLI opens a run's checkpoints read-only; orbax warned three times
  # that it was so, on every evaluation.
  import logging  # noqa: PLC0415
  state = _replicated_state(big_rows=8)
  writer = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2)
  writer.save(3, state)
  writer.close()
  caplog.set_level(logging.INFO, logger="absl")
  reader = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, read_only=True)
  restored, step = reader.restore_latest(state)
  reader.close()
  assert step == 3 and np.array_equal(restored["kernel"], state["kernel"])
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
  assert logging.getLogger("absl").level == logging.INFO  # the level is the caller's again


def _corrupt(step_dir):
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")


def test_restore_walks_back_from_the_newest_readable_step_and_moves_aside_only_when_writable(tmp_path):
  import pytest  # noqa: PLC0415
  state = _replicated_state(big_rows=8)
  at = lambda step: jax.tree.map(lambda x: x * step if x.dtype == jnp.float32 else x + step, state)
  directory = tmp_path / "checkpoints"
  writer = checkpoints.Checkpointer(directory, keep=3, async_save=False)
  for step in (2, 4, 6):
    writer.save(step, at(step))
  writer.save(4, at(40))  # a step saved already (the final step equal to a periodic one): kept as it was
  writer.close()
  logs = []
  open_ = lambda **kw: checkpoints.Checkpointer(directory, keep=3, log=logs.append, **kw)

  def restore(reader, like=state, **kw):
    try:
      return reader.restore_latest(like, **kw)
    finally:
      reader.close()

  for at_most, want in ((None, 6), (5, 4), (4, 4), (3, 2)):
    restored, step = restore(open_(read_only=True), at_most=at_most)
    assert step == want
    np.testing.assert_array_equal(restored["big"], at(want)["big"])
    assert int(restored["step"]) == 7 + want
  assert restore(open_(read_only=True), at_most=1) == (None, None)
  assert logs == []

  # Another config's state (a wider model): refused before any array is read, nothing moved.
  wider = dict(state, kernel=jnp.zeros((3, 3, 4, 16)))
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint at step 6 .* holds a different train state "
                                                        r"than this config builds \(kernel: saved with shape "
                                                        r"\(3, 3, 4, 8\), this config's is \(3, 3, 4, 16\)"):
    restore(open_(read_only=True), wider)

  _corrupt(directory / "6")
  restored, step = restore(open_(read_only=True))  # an evaluation of a run: reads, moves nothing
  assert step == 4 and np.array_equal(restored["big"], at(4)["big"])
  assert len(logs) == 1 and logs[0].startswith("checkpoint at step 6 is unreadable (")
  assert logs[0].endswith("; trying the previous one") and (directory / "6").is_dir()
  assert not (tmp_path / "checkpoints_unreadable").exists()
  logs.clear()
  restored, step = restore(open_())  # a resumed run: the damaged step is set aside, never deleted
  assert step == 4 and np.array_equal(restored["kernel"], at(4)["kernel"])
  assert len(logs) == 1 and logs[0].endswith(f"moved it to {tmp_path / 'checkpoints_unreadable' / '6'} and trying "
                                             "the previous one")
  assert not (directory / "6").exists() and (tmp_path / "checkpoints_unreadable" / "6").is_dir()
  # The rerun saves a step 6 again, which is damaged too: kept beside the first copy.
  writer = checkpoints.Checkpointer(directory, keep=3, async_save=False)
  writer.save(6, at(6))
  writer.close()
  _corrupt(directory / "6")
  logs.clear()
  assert restore(open_())[1] == 4
  assert logs[0].endswith(f"moved it to {tmp_path / 'checkpoints_unreadable' / '6.1'} and trying the previous one")
  assert sorted(p.name for p in (tmp_path / "checkpoints_unreadable").iterdir()) == ["6", "6.1"]

  for step in (2, 4):
    _corrupt(directory / str(step))
  with pytest.raises(checkpoints.CheckpointError, match=r"no readable checkpoint in .* \(tried steps \[2, 4\]\); "
                                                        r"move the directory away to start afresh$"):
    restore(open_(read_only=True))
