"""Benchmark: images/s of the 4-view pretraining pipeline, per CPU core.

    python -m experiments.bench_input [--batch 256] [--steps 30] [--size 32]

Runs care_jax.input_pipeline.pretraining_dataset (x1, x2 per image; e1, e2 per
chunk of 16) on random uint8 images of the given size and reports source images
per second (each yields 4 views) for the whole machine and per core, with a
baseline in the same run: the same pipeline with only the crop + flip (no
colour ops, no blur), which bounds what the colour augmentations cost.
"""

import argparse
import os
import time

import numpy as np

from care_jax import augment, input_pipeline as ip


def _rate(ds, steps, batch):
  it = ds.as_numpy_iterator()
  next(it)  # build and warm up
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--size", type=int, default=32)
  args = parser.parse_args(argv)
  cores = os.cpu_count() or 1
  rng = np.random.default_rng(0)
  data = ip.ArrayDataset(rng.integers(0, 256, (8192, args.size, args.size, 3), dtype=np.uint8),
                         np.zeros(8192, np.int32), 10)
  full = augment.AugmentConfig(image_size=args.size)
  crop_only = augment.AugmentConfig(image_size=args.size, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
  kw = dict(seed=0, global_batch=args.batch, num_chunks=args.batch // 16, num_steps=args.steps + 1)
  rate = _rate(ip.pretraining_dataset(data, aug=full, **kw), args.steps, args.batch)
  base = _rate(ip.pretraining_dataset(data, aug=crop_only, **kw), args.steps, args.batch)
  print(f"# 4-view pretraining pipeline, {args.size}x{args.size}, batch {args.batch}, {cores} cores")
  print(f"{'pipeline':<28} {'images/s':>10} {'per core':>10}")
  print(f"{'full SimCLR augmentations':<28} {rate:10.0f} {rate / cores:10.0f}")
  print(f"{'baseline: crop+flip only':<28} {base:10.0f} {base / cores:10.0f}")


if __name__ == "__main__":
  main()
