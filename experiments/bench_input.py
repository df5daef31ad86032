"""Benchmark: images/s of the 4-view pretraining pipeline, per CPU core.

    python -m experiments.bench_input [--batch 256] [--steps 40] [--rounds 3] [--size 32]

Runs care_jax.input_pipeline.pretraining_dataset (x1, x2 per image; e1, e2 per
chunk of 16) on random uint8 images of the given size and reports source images
per second (each yields 4 views) for the whole machine and per core, with a
baseline in the same run: the same tf.data pipeline (stateless shuffle, gather,
parameter sampling, 4 views, AUTOTUNE map) whose views get only the
RandomResizedCrop + flip (crop_and_resize, then normalisation as TF ops), i.e.
what the colour jitter, grayscale and blur add on top of a minimal SimCLR crop.
Rounds alternate the two pipelines and the median is printed (shared machines
are noisy).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow and jaxlib load (care_jax/main.py)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from care_jax import augment, input_pipeline as ip

_NUM_IMAGES = 8192  # the random source images the batches are drawn from


def _crop_flip_pipeline(images, cfg, *, batch, num_steps):
  """The baseline: pretraining_dataset's structure (per-step stateless shuffle and gather, four
  views, parameters per image or per chunk, AUTOTUNE map, prefetch) with views that get only
  RandomResizedCrop + flip and normalisation, as plain TF ops."""
  scale = 1.0 / (255.0 * np.asarray(cfg.std, np.float32))
  shift = -np.asarray(cfg.mean, np.float32) / np.asarray(cfg.std, np.float32)
  source = tf.constant(images)
  n, size = len(images), images.shape[1]

  @tf.autograph.experimental.do_not_convert
  def views(step):
    order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(0, tf.int64), step]))
    x = tf.gather(source, order[:batch])
    out = {}
    for view, count in enumerate((batch, batch, batch // 16, batch // 16)):
      p = augment.sample_params(augment.view_seed(0, step, view), count, size, size, cfg)
      p = augment.params_for_rows(p, tf.range(batch), batch // count)
      out[f"v{view}"] = augment.crop_resize(x, p["crop"], cfg.image_size, flip=p["flip"]) * scale + shift
    return out

  return tf.data.Dataset.range(num_steps).map(views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _rate(ds, steps, batch):
  it = ds.as_numpy_iterator()
  for _ in range(3):  # build, compile, let AUTOTUNE settle
    next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--size", type=int, default=32)
  args = parser.parse_args(argv)
  if args.batch < 16 or args.batch % 16 or args.batch > _NUM_IMAGES:
    parser.error(f"--batch must be a multiple of 16 (L_equi's chunk) from 16 to {_NUM_IMAGES}, got {args.batch}")
  if args.size < 8:
    parser.error(f"--size must be >= 8 pixels (the blur kernel and crops need room), got {args.size}")
  if args.steps < 1 or args.rounds < 1:
    parser.error(f"--steps and --rounds must be >= 1 (got {args.steps}, {args.rounds})")
  cores = os.cpu_count() or 1
  rng = np.random.default_rng(0)
  data = ip.ArrayDataset(rng.integers(0, 256, (_NUM_IMAGES, args.size, args.size, 3), dtype=np.uint8),
                         np.zeros(_NUM_IMAGES, np.int32), 10)
  cfg = augment.AugmentConfig(image_size=args.size)
  kw = dict(seed=0, global_batch=args.batch, num_chunks=args.batch // 16, aug=cfg, num_steps=args.steps + 3)
  rates = {"full": [], "base": []}
  for _ in range(args.rounds):
    rates["full"].append(_rate(ip.pretraining_dataset(data, **kw), args.steps, args.batch))
    base = _crop_flip_pipeline(data.images, cfg, batch=args.batch, num_steps=args.steps + 3)
    rates["base"].append(_rate(base, args.steps, args.batch))
  full, base = (float(np.median(rates[k])) for k in ("full", "base"))
  print(f"# 4-view pretraining pipeline, {args.size}x{args.size}, batch {args.batch}, {cores} cores, "
        f"TF {tf.__version__}, median of {args.rounds} rounds of {args.steps} steps")
  print(f"{'pipeline':<40} {'images/s':>10} {'per core':>10}")
  print(f"{'full SimCLR augmentations (care_jax)':<40} {full:10.0f} {full / cores:10.0f}")
  print(f"{'baseline: crop + flip only, TF ops':<40} {base:10.0f} {base / cores:10.0f}")
  print(f"full / baseline: {full / base:.2f}")


if __name__ == "__main__":
  main()
