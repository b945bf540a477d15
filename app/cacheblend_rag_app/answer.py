"""An answer from the RAG pipeline, with the blend statistics of the LLM call(s) that produced it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Answer:
    """One question answered by the query engine.

    ttft_s: time to first token of the first LLM call, as the engine measures it (prefill with the blend,
        from the request's start; retrieval not included). None when no LLM call was made (nothing retrieved).
    prompt_tokens, reused_tokens, recomputed_tokens, cache_hits, cache_misses: summed over the LLM calls
        (one call in the default ``compact`` response mode). reused + recomputed = prompt tokens.
    sources: the retrieved nodes, best first: ``{"name": file name, "score": similarity}``.
    """

    question: str
    text: str
    strategy: str
    recompute_ratio: float | None
    ttft_s: float | None = None
    prompt_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    llm_calls: int = 0
    sources: list[dict] = field(default_factory=list)

    def add_call(self, stats: dict) -> None:
        """Fold in one LLM call's statistics (``CompletionResponse.additional_kwargs`` of CacheBlendLLM)."""
        if self.ttft_s is None:
            self.ttft_s = float(stats["ttft_s"])
        for name in ("prompt_tokens", "reused_tokens", "recomputed_tokens", "cache_hits", "cache_misses"):
            setattr(self, name, getattr(self, name) + int(stats[name]))
        self.llm_calls += 1

    @property
    def reuse_fraction(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "reuse_fraction": self.reuse_fraction}


class CallRecorder:
    """Collects the blend statistics of every CacheBlendLLM call while it is installed (a ``with`` block).

    LlamaIndex reports each finished LLM call as an instrumentation event whose response carries the
    request's statistics (for a stream: the last response). The dispatcher is process-wide, so one recorder
    sees every call made meanwhile: use one ``ask`` at a time per process.
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._handler = None

    def __enter__(self) -> CallRecorder:
        from llama_index.core.instrumentation import get_dispatcher
        from llama_index.core.instrumentation.event_handlers import BaseEventHandler
        from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent

        calls = self.calls

        class _Handler(BaseEventHandler):
            @classmethod
            def class_name(cls) -> str:
                return "CacheBlendCallRecorder"

            def handle(self, event, **kwargs) -> None:
                if isinstance(event, (LLMCompletionEndEvent, LLMChatEndEvent)) and event.response is not None:
                    stats = getattr(event.response, "additional_kwargs", None) or {}
                    if "reused_tokens" in stats:
                        calls.append(dict(stats))

        self._handler = _Handler()
        get_dispatcher().add_event_handler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        from llama_index.core.instrumentation import get_dispatcher

        handlers = get_dispatcher().event_handlers
        if self._handler in handlers:
            handlers.remove(self._handler)
        self._handler = None
