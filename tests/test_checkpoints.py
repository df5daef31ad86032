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
