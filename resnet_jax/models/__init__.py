"""The ResNet family: `create(name, num_classes=...)`, `list_models()`, `register(...)`."""

from resnet_jax.models.registry import (MODEL_SPECS, create, expand_parts, is_preact, list_models,
                                        part_of, register)
from resnet_jax.models.resnet import DEFAULT_LAYERS, ResNet

__all__ = ["DEFAULT_LAYERS", "MODEL_SPECS", "ResNet", "create", "expand_parts", "is_preact",
           "list_models", "part_of", "register"]
