"""CARE on CIFAR-10, the reference release's settings (ResNet-50, Adam 1e-3, 400 epochs).

  python -m care_jax.main --config=configs/cifar10_care.py --workdir=runs/cifar10_care --config.data_dir=DIR

The release's pipeline as its code runs it: config_lib.release_cifar_stl_pipeline.
Expected: paper Figure 4, ResNet-50 linear probe top-1 91.92% (SimCLR 90.98%).
Needs the tfds cifar10 dataset prepared under DIR and an accelerator.
"""

from care_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.dataset = "cifar10"
  c.image_size = 32
  c.model = "resnet50"
  c.batch_size = 256
  c.num_epochs = 400.0
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-6
  c.temperature = 0.5
  c.equiv_weight = 0.03
  c.equiv_splits = 16
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 5000
  return config_lib.release_cifar_stl_pipeline(c)
