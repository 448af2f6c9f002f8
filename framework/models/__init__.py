"""Model families by name; importing this package registers each of them in `REGISTRY`."""

from framework.models import cnn, mlp, transformer  # noqa: F401  (imported to register)
from framework.models.registry import REGISTRY, Model, ModelConfig, get, register

__all__ = ["REGISTRY", "Model", "ModelConfig", "get", "register"]
