"""Where training scalars go: workdir/metrics.jsonl, TensorBoard event files, stderr.

The TensorBoard writer encodes the event protocol buffers by hand (a scalar
summary is five fields), so the core needs neither TensorFlow nor the
tensorboard package; TensorBoard and tf.data.TFRecordDataset read the files.
Only process 0 writes (see `create`).
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import struct
import sys
import time
from typing import Mapping, Optional

from etils import epath


# --------------------------------------------------------------- TFRecord framing

def _crc32c_table():
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


# --------------------------------------------------------------- Event protos

def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: Optional[str] = None,
           scalars: Optional[Mapping[str, float]] = None) -> bytes:
  # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5.
  out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    # Summary.value = 1; Value.tag = 1, Value.simple_value = 2 (float).
    values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v))
                      for tag, v in scalars.items())
    out += _field_bytes(5, values)
  return bytes(out)


class TensorBoardWriter:
  """Scalars as a TensorBoard event file in `logdir`, created with the first scalars: a run
  that ends before logging any (refused by a data check, or already finished) leaves no
  header-only file behind."""

  def __init__(self, logdir):
    self.logdir = epath.Path(logdir)
    self._file = None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    finite = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not finite:
      return
    if self._file is None:
      now = time.time()
      self.logdir.mkdir(parents=True, exist_ok=True)
      self._file = (self.logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.care_jax").open("wb")
      self._file.write(_record(_event(now, 0, file_version="brain.Event:2")))
    self._file.write(_record(_event(time.time(), int(step), scalars=finite)))
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


# --------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
  """A file opened for writing beside `path` and renamed over it once closed, so a run
  killed midway leaves the old file or the new one, never part of one."""
  path = epath.Path(path)
  partial = path.parent / (path.name + ".partial")
  with partial.open(mode) as f:
    yield f
  partial.replace(path)


def write_atomically(path, text: str) -> None:
  with atomic_file(path) as f:
    f.write(text)


class DamagedFileError(ValueError):
  """A run file that exists but does not parse; str(error) names it and why."""


def read_json(path):
  """A JSON file's value, None where the file does not exist. One that does not parse
  (edited by hand, or written before writes went aside and renamed) raises
  DamagedFileError; each caller says what that means for its file."""
  path = epath.Path(path)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedFileError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None


def read_derived_json(path, log, redo: str):
  """read_json for a file made from other files (a report from a checkpoint): None where it
  is missing, or damaged, which is logged as '<why>: <redo>' for the caller to make again."""
  try:
    return read_json(path)
  except DamagedFileError as e:
    log(f"{e}: {redo}")
    return None


def read_jsonl(path) -> list:
  """The rows of a JSON-lines file; a line that does not parse (cut short by a kill or a
  full disk while it was appended) is left out rather than failing every later reader."""
  rows = []
  for line in epath.Path(path).read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


# --------------------------------------------------------------- the writer

class MetricWriter:
  """metrics.jsonl + TensorBoard + a progress line on stderr."""

  def __init__(self, workdir, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.jsonl = epath.Path(workdir) / "metrics.jsonl"
    self._tb = TensorBoardWriter(workdir) if enabled else None

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (a resumed run logs those steps again), and a last
    line a killed run left half-written."""
    if not self.enabled or not self.jsonl.exists():
      return
    keep = [json.dumps(row) for row in read_jsonl(self.jsonl) if row.get("step", 0) <= step]
    write_atomically(self.jsonl, "".join(line + "\n" for line in keep))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with self.jsonl.open("a") as f:
      f.write(json.dumps(row) + "\n")
    self._tb.write_scalars(step, {k: v for k, v in row.items() if k != "step"})

  def progress(self, step: int, loss: float, images_per_sec: float, seconds_per_step: float) -> None:
    if not self.enabled:
      return
    eta = max(0, self.total_steps - step) * seconds_per_step
    print(f"step {step}/{self.total_steps}  loss {loss:.4f}  {images_per_sec:,.0f} img/s  "
          f"ETA {_duration(eta)}", file=sys.stderr, flush=True)

  def note(self, message: str) -> None:
    if self.enabled:
      print(message, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  if isinstance(v, (bool, int, str)) or v is None:
    return v
  v = float(v)
  return v if math.isfinite(v) else repr(v)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"
