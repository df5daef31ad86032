"""Entry point: python -m care_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Overrides: --config.<field>=<value>. Rerunning with the same workdir resumes
from its latest checkpoint. Any bad input ends with one line on stderr naming
the field and the fix, and a non-zero exit status.
"""

from __future__ import annotations

import os
import re
import sys

# TensorFlow's C++ INFO/WARNING lines, among them 4 grappler "Error in PredictCost()"
# warnings per tf.data pipeline. Set before anything imports jax (config_lib does):
# set after it, the variable no longer silences them (measured; jaxlib's C++
# logging, which they then go through, has read it at load).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from care_jax import config_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:preset]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")


def _fail(message: str, status: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _unknown_override(argv) -> str | None:
  """The first --config.<field> override that names no field, said with the closest one."""
  fields = list(config_lib.default_config().keys())
  for arg in argv[1:]:
    m = re.match(r"--config\.([A-Za-z0-9_.]+)", arg)
    if m and m.group(1).split(".")[0] not in fields:
      name = m.group(1)
      hint = config_lib.did_you_mean(name, fields)
      return f"--config.{name}: the config has no field {name!r}.{hint} (fields: see configs/quickstart.py)"
  return None


def parse_flags(argv):
  """absl's parser, with every parsing error reduced to one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags errors come as many types.
    # The last line is the cause (a config file's own error among them), less its type.
    _fail(_unknown_override(argv) or re.sub(r"^[\w.]+Error: ", "", str(e).strip().splitlines()[-1]))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config=..., --workdir=... and --config.<field>=<value>")
  if _CONFIG.value is None or _WORKDIR.value is None:
    _fail("--config and --workdir are required, e.g. --config=configs/quickstart.py --workdir=runs/quickstart")
  try:
    config = _CONFIG.value
    config.keys()  # A config file that failed to load raises here.
  except Exception as e:  # noqa: BLE001
    _fail(f"--config: could not load {flags.FLAGS['config'].config_filename!r}: "
          f"{str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__}")

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO.
  import jax  # After flag parsing, so --help stays fast.
  from care_jax import checkpoints, train
  train.maybe_initialize_distributed(config)
  try:
    config_lib.validate(config, jax.device_count())  # before train_and_evaluate makes the workdir
    train.train_and_evaluate(config, _WORKDIR.value)
  # ConfigError covers the input pipeline's DatasetUnavailableError too.
  except (config_lib.ConfigError, checkpoints.CheckpointError, train.TrainingDivergedError) as e:
    _fail(str(e), 1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
