"""care-jax: CARE (Contrastive Augmentation-induced Rotational Equivariance) in JAX/Flax.

Importing the package imports nothing heavy; modules are imported by name
(care_jax.losses, care_jax.geometry, ...). Only care_jax.input_pipeline and
care_jax.augment import TensorFlow (care_jax.datasets imports the first
only for tfds names and image folders).
"""
__version__ = "0.1.0"
