"""The blending engine: prompts, chunks, planning, the blended prefill, decoding."""

from .engine import CacheBlendEngine
from .generation import GenerationResult, GenerationStream
from .sampling import SamplingParams
from .stats import RequestStats

__all__ = ["CacheBlendEngine", "GenerationResult", "GenerationStream", "RequestStats", "SamplingParams"]
