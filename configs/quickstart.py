"""The embedded default: CARE on Fashion-MNIST with a narrow CIFAR-stem ResNet-18, CPU-sized.

  python -m care_jax.main --config=configs/quickstart.py --workdir=runs/quickstart   (= make demo)
  presets: configs/quickstart.py:smoke  (a few steps of a tiny model; tests and CI)
           :moco, :moco_care             (MoCo-v2 without / with CARE)
           :hyperboloid, :symplectic     (CARE with the Lorentz or symplectic form)

Expected (2-core CPU, 6-25 minutes of pretraining): linear-probe top-1 78.8-79.8 and
kNN top-1 76.5-77.1, against 64.4 and 71.6 for the random-init encoder that
report.json holds beside them (five `make demo` runs, 2026-12-03..07; README).
"""

from care_jax import config_lib


def get_config(preset: str = ""):
  c = config_lib.default_config()
  c.dataset = "fashion_mnist"
  c.image_size = 32  # 28 -> 32, the CIFAR geometry the release's augmentations assume.
  c.model = "resnet18"
  c.model_width = 0.125  # channels 8-16-32-64: ~1/64 of ResNet-18's compute.
  c.batch_size = 256
  c.num_train_steps = 360
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-6
  c.temperature = 0.5
  c.equiv_weight = 0.03  # the release's CIFAR-10 values
  c.equiv_splits = 16
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 0
  c.wahba_examples = 1000
  c.random_init_baseline = True
  if preset in ("moco_care", "moco"):
    # MoCo-v2 (+ CARE) at quickstart size: 16 x 256 = 4096 queued negatives,
    # 8 BatchNorm groups of 32 (keys shuffled across them), the MoCo-v2 head.
    c.objective = preset
    c.equiv_weight = 0.03 if preset == "moco_care" else 0.0
    c.temperature = 0.2
    c.moco_momentum = 0.99
    c.moco_queue_size = 4096
    c.moco_bn_groups = 8
    c.proj_head = "mocov2"
  elif preset in ("hyperboloid", "symplectic"):
    # CARE beyond the sphere: Lorentz-model embeddings (Minkowski form) or the
    # symplectic form in L_equi. Same data, model and budget as the default.
    c.geometry = preset
  elif preset == "smoke":
    c.model_width = 0.0625
    c.proj_hidden_dim = 32
    c.proj_dim = 16
    c.image_size = 16
    c.batch_size = 32
    c.equiv_splits = 8
    c.num_train_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.eval_batch_size = 256
    # Pretraining reads 8192 images: loading and resizing all 60000 costs ~1.5 s
    # a run, and the tests start some twenty smoke runs.
    c.train_split = "train[:8192]"
    # The four views in one pass (interleaved): the same loss, gradients and
    # BatchNorm statistics as sequential passes (tests/test_train.py checks it),
    # and half the compile time (6 vs 13 s on 2 cores), which is most of a
    # smoke run's cost. The full-size presets keep the faster-running default.
    c.view_batching = "batched"
    c.knn_k = 20
    c.knn_monitor_examples = 512
    # kNN bank and probe training set, and the test queries: a few seconds of
    # feature extraction at the tests' -O0 (tests/conftest.py), not a minute.
    c.eval_train_split = "train[:2048]"
    c.test_split = "test[:1024]"
    c.linear_probe_epochs = 2
    c.wahba_trials = 3
    c.composition_trials = 2
    c.wahba_examples = 64
    c.random_init_baseline = False
  elif preset:
    presets = ("smoke", "moco", "moco_care", "hyperboloid", "symplectic")
    raise config_lib.ConfigError(f"configs/quickstart.py: unknown preset {preset!r}; use :{', :'.join(presets)} "
                                 f"or none.{config_lib.did_you_mean(preset, presets)}")
  return c
