"""The ResNet family: `create(name, num_classes=...)` and `list_models()`."""

from resnet_jax.models.registry import MODEL_SPECS, create, list_models
from resnet_jax.models.resnet import ResNet

__all__ = ["MODEL_SPECS", "ResNet", "create", "list_models"]
