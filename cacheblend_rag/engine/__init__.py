"""The blending engine: planning, the blended prefill, decoding."""

from .engine import CacheBlendEngine
from .request import GenerationResult, GenerationStream
from .stats import RequestStats

__all__ = ["CacheBlendEngine", "GenerationResult", "GenerationStream", "RequestStats"]
