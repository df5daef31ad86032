"""The paper's ablation L_equi + L_unif (no invariance term) on CIFAR-10, release settings.

  python -m care_jax.main --config=configs/cifar10_equi_unif.py --workdir=runs/cifar10_equi_unif --config.data_dir=DIR

L_equi's views as the release makes them: its chunks come from one
vmap(process, randomness='same') call, which samples ONE augmentation pair
per step for all chunks (experiments/release_equiv_views.py shows it), so
equiv_augment_pairs=1; 0 gives design.md's one pair per chunk.
The linear probe is the release's (linear_probe_protocol='augmented'): augmented
training images through the frozen encoder with BatchNorm in training mode.
BatchNorm per half batch (bn_groups=2), as the release's nn.DataParallel on
the 2 GPUs its scripts request computes it.
Expected (paper Figure 2): well above random-init features, below SimCLR and CARE.
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
  c.objective = "equi_unif"
  c.equiv_weight = 1.0  # both terms at unit weight, the ablation as the paper writes it
  c.equiv_splits = 16
  c.equiv_augment_pairs = 1  # one pair per step, shared by all chunks (the release)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 5000
  c.linear_probe_protocol = "augmented"  # the release's linear.py
  c.resize_antialias = True  # crops resampled as torchvision's resized_crop (PIL bilinear)
  c.bn_groups = 2  # its scripts: nn.DataParallel on 2 V100s, BatchNorm per GPU
  return c
