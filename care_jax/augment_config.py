"""The augmentation settings both backends read (TF-free, so the device backend needs no TF).

AugmentConfig holds the SimCLR pipeline's parameters (the reference release's
values as defaults); augment_config(dataset, ...) adds the dataset's
normalisation statistics. care_jax/augment.py (tf.data) and
care_jax/augment_jax.py (on device) apply the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

# Per-channel statistics for normalisation (grey datasets repeat one value). CIFAR and
# STL-10: the reference release's values (its dataset.py), not recomputed ones; its
# CIFAR-10 std (0.2023, ...) is the widely copied figure, not the pixels' true std
# (0.2470, 0.2435, 0.2616), and its STL-10 statistics are its own.
DATASET_STATS = {
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": ((0.4406, 0.4273, 0.3858), (0.2312, 0.2265, 0.2237)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  image_size: int
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple = (0.1, 2.0)
  # The release's ImageNet-100 setting: equivariance views without the crop.
  equiv_crop: bool = True
  # How a crop box is resampled to image_size. False: bilinear through the box's corner
  # pixels (tf.image.crop_and_resize), no antialiasing. True: torchvision / PIL's
  # resized_crop, half-pixel centres and a triangle filter widened by the downscale
  # factor, so a box bigger than the output is averaged, not aliased (the releases).
  antialias: bool = False

  @property
  def blur_kernel_size(self) -> int:
    k = max(3, int(0.1 * self.image_size))
    return k if k % 2 else k + 1


def dataset_stats(name: str):
  base = name.split(":")[0]
  return DATASET_STATS.get(base, _IMAGENET_STATS if "imagenet" in base else ((0.5,) * 3, (0.5,) * 3))


def augment_config(dataset: str, image_size: int, equiv_crop: bool = True, antialias: bool = False) -> AugmentConfig:
  """The SimCLR augmentation settings with the dataset's normalisation statistics."""
  mean, std = dataset_stats(dataset)
  return AugmentConfig(image_size=image_size, mean=mean, std=std, equiv_crop=equiv_crop, antialias=antialias)


def from_config(config) -> AugmentConfig:
  """The run config's augmentation settings, for training (both backends), evaluation and
  the benchmarks alike: dataset statistics, image_size, equiv_crop, resize_antialias."""
  return augment_config(config.dataset, config.image_size, config.equiv_crop, config.resize_antialias)
