"""MoCo-v2 on ImageNet-100 with the reference release's settings (paper: linear probe 73.16%).

  python -m care_jax.main --config=configs/imagenet100_moco.py --workdir=runs/imagenet100_moco \
      --config.data_dir=DIR

configs/imagenet100_care.py's data, model and optimiser (ResNet-50, ImageNet
stem, SGD 0.4 cosine, 200 epochs, batch 256, temperature 0.2) with MoCo-v2's
momentum key encoder (0.99), a queue of 65536 negatives and its MLP head (2048
hidden, no BatchNorm). BatchNorm runs in 4 groups of 64 with the keys shuffled
across them (MoCo's shuffled BN over the release's 4 GPUs); the grouping is
part of the config, so a run reproduces on any device count.
Data as configs/imagenet100_care.py: tfds imagenet2012 under data_dir, the 100
classes streamed for pretraining.
"""

import pathlib

from care_jax import config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("imagenet100_care.py"))
  c.objective = "moco"
  c.equiv_weight = 0.0
  c.moco_momentum = 0.99
  c.moco_queue_size = 65536
  c.moco_bn_groups = 4  # the release's 4 GPUs, 64 images each
  c.proj_head = "mocov2"
  c.proj_hidden_dim = 2048
  return c
