"""How many augmentation pairs the reference release's CIFAR/STL step draws for L_equi.

  pip install torch torchvision && python -m experiments.release_equiv_views

The release makes its equivariance views by splitting the batch into K chunks and
calling `vmap(process, randomness='same')` over them, where `process` builds two
torchvision SimCLR pipelines (RandomResizedCrop, flip, jitter, grayscale, blur,
normalise) and applies each transform with an inner `vmap(..., randomness='same')`
over the chunk's images. design.md reads that as one pair per chunk. vmap runs the
Python body once for all chunks and 'same' randomness gives every chunk the same
draws, so it could as well be one pair per step. This script rebuilds that
structure (our code, the release's transforms and vmap calls) on K chunks holding
the same images and reports whether the chunks' views coincide: they do, on every
step, so the release draws ONE pair per step (configs: equiv_augment_pairs=1).
A Python loop over the chunks, the control, gives each chunk its own pair.
Exit status 1 if the views do not behave as stated.
"""

from __future__ import annotations

import sys

import numpy as np


def simclr_transforms(transforms):
  """The release's e-view pipeline (dataset.get_transforms) for 32x32 outputs."""
  def blur(img):  # the release's TorchGaussianBlur: p 0.5 drawn with NumPy, kernel int(0.1 * 32)
    return transforms.GaussianBlur(3, sigma=(0.1, 2.0))(img) if np.random.random_sample() < 0.5 else img

  return [transforms.RandomResizedCrop(32), transforms.RandomHorizontalFlip(p=0.5),
          transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
          transforms.RandomGrayscale(p=0.2), blur,
          transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))]


def main(steps: int = 5, num_chunks: int = 8, chunk_size: int = 4) -> int:
  try:
    import torch  # noqa: PLC0415 (optional: the check needs the release's framework)
    from torch.func import vmap  # noqa: PLC0415 (functorch.vmap, as the release imports it)
    from torchvision import transforms  # noqa: PLC0415
  except ImportError as e:
    print(f"error: this check needs torch and torchvision ({e}); pip install torch torchvision", file=sys.stderr)
    return 2

  def process(chunk):
    v1, v2 = chunk.clone(), chunk.clone()
    t1, t2 = simclr_transforms(transforms), simclr_transforms(transforms)
    for f1, f2 in zip(t1, t2):
      v1 = vmap(f1, randomness="same")(v1)
      v2 = vmap(f2, randomness="same")(v2)
    return v1, v2

  def chunks_coincide(views):
    return all(torch.allclose(views[0], views[k]) for k in range(1, len(views)))

  torch.manual_seed(0)
  np.random.seed(0)
  chunk = torch.rand(chunk_size, 3, 32, 32)
  batch = chunk.expand(num_chunks, *chunk.shape).clone()  # every chunk holds the same images
  ok = True
  for step in range(steps):
    e1, e2 = vmap(process, randomness="same")(batch)
    shared = chunks_coincide(e1) and chunks_coincide(e2)
    distinct = not torch.allclose(e1[0], e2[0])  # a1 and a2 are two draws
    print(f"step {step}: the {num_chunks} chunks share a1 and a2: {shared}; a1 != a2: {distinct}")
    ok &= shared and distinct
  looped = torch.stack([process(batch[k])[0] for k in range(num_chunks)])
  print(f"control, a Python loop over the chunks: the chunks share a1: {chunks_coincide(looped)}")
  ok &= not chunks_coincide(looped)
  print("=> one augmentation pair per step, shared by all chunks" if ok else "=> NOT as stated")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
