"""Model loading and the layer-by-layer forward."""

from .forward import SUPPORTED_ARCHITECTURES, ModelForward, UnsupportedModelError
from .loading import ModelNotFoundError, default_cache_dir, load_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelForward",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "default_cache_dir",
    "load_model",
]
