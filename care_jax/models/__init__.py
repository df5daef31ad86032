"""Flax encoders: torchvision-layout ResNets and CARE's projection head."""
from care_jax.models.resnet import (STAGE_SIZES, STEMS, ContrastiveModel, ProjectionHead, ResNet,
                                    build_encoder, build_model, feature_dim, l2_normalize)
