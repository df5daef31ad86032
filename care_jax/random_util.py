"""Random draws over multi-dimensional shapes, made as one flat draw.

jax's (partitionable) threefry numbers each element by its flat index, so a
sampler called with the flat size and reshaped gives the same numbers as
called with the shape itself. XLA:CPU compiles the multi-dimensional form
pathologically slowly (jax 0.10, 2 cores: 10 draws of 4-D kernel shapes 85 s,
the same numbers drawn flat 1.7 s), so every draw of a 2-D+ shape goes
through `drawn_flat`. tests/test_models.py checks flax's default init
against models/resnet.lecun_normal bit for bit.
"""

import math


def drawn_flat(sample, key, shape, **kwargs):
  """sample(key, shape=shape, **kwargs) (a jax.random sampler), drawn flat and reshaped."""
  return sample(key, shape=(math.prod(shape),), **kwargs).reshape(shape)
