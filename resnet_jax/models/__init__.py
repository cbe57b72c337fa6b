"""The ResNet family: `create(name, num_classes=...)`, `list_models()`, `register(...)`."""

from resnet_jax.models.registry import MODEL_SPECS, create, is_preact, list_models, register
from resnet_jax.models.resnet import DEFAULT_LAYERS, ResNet

__all__ = ["DEFAULT_LAYERS", "MODEL_SPECS", "ResNet", "create", "is_preact", "list_models",
           "register"]
