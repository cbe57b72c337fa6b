"""resnet_jax: residual networks in JAX/Flax, trained from config files on any mesh."""

__version__ = "0.1.0"
