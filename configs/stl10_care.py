"""CARE on STL-10 with the reference release's settings (ResNet-50, SGD 0.06 cosine, 400 epochs).

  python -m care_jax.main --config=configs/stl10_care.py --workdir=runs/stl10_care --config.data_dir=DIR

Pretrains on unlabelled+train (105k images), evaluates on train/test. At the
release's resolution: its STL-10 pipeline crops every view to 32x32 from the
96x96 originals (RandomResizedCrop(32)) and resizes evaluation images to 32
(Resize(32)) for the CIFAR-stem ResNet-50, so image_size=32 with
source_image_size=96: the training images stay 96x96 and the crops come from
them, the evaluation splits are resized to 32 with antialiasing.
The release's pipeline as its code runs it: config_lib.release_cifar_stl_pipeline.
Expected: paper Figure 4, ResNet-50 linear probe top-1 84.64% (SimCLR 84.19%).
"""

from care_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.dataset = "stl10"
  c.train_split = "unlabelled+train"
  c.eval_train_split = "train"
  c.image_size = 32  # the release trains and evaluates STL-10 at 32x32
  c.source_image_size = 96  # views cropped from the 96x96 originals
  c.model = "resnet50"
  c.batch_size = 256
  c.num_epochs = 400.0
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 0.06
  c.weight_decay = 5e-4
  c.schedule = "cosine"
  c.warmup_epochs = 10.0
  c.temperature = 0.5
  c.equiv_weight = 0.01
  c.equiv_splits = 8
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 10000
  return config_lib.release_cifar_stl_pipeline(c)
