"""The blending engine: prompts, chunks, strategies, the blended prefill, decoding.

Besides ``CacheBlendEngine`` and what it returns, this package exports what experiments and benchmarks build on:
the research API of ``research.py`` (a request's reused prompt, plans that recompute chosen rows, running and
scoring them), the strategy interfaces (``Strategy``, ``Selection``, ``strategy_for``), and the decoding pieces
(``decode_step``, ``TextStreamer``, ``Sampler``, the batched decode: ``KVSlots``, ``batch_step``, ``RunningBatch``).
"""

from .batch_step import batch_step
from .cost import CostModel, ModelShape
from .decode import decode_step
from .engine import CacheBlendEngine
from .generation import GenerationResult, GenerationStream
from .kv_slots import KVSlots
from .plan import CachedSpan, PrefillPlan
from .prepare import PreparedRequest
from .research import PlanRun, ReusedPrompt, attention_mass, reused_prompt, run_plan, teacher_force
from .running_batch import RunningBatch
from .sampling import Sampler, SamplingParams
from .segments import TokenRun
from .stats import RequestStats
from .strategies import Selection, Strategy, strategy_for
from .text_stream import TextStreamer

__all__ = [
    "CacheBlendEngine",
    "CachedSpan",
    "CostModel",
    "GenerationResult",
    "GenerationStream",
    "KVSlots",
    "ModelShape",
    "PlanRun",
    "PrefillPlan",
    "PreparedRequest",
    "RequestStats",
    "ReusedPrompt",
    "RunningBatch",
    "Sampler",
    "SamplingParams",
    "Selection",
    "Strategy",
    "TextStreamer",
    "TokenRun",
    "attention_mass",
    "batch_step",
    "decode_step",
    "reused_prompt",
    "run_plan",
    "strategy_for",
    "teacher_force",
]
