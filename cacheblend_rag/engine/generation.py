"""A request after its prefill: decoding, streaming, and the final GenerationResult."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .decode import GRAPH_MIN_TOKENS, Decoder
from .prepare import PreparedRequest
from .sampling import Sampler
from .stats import RequestStats
from .text_stream import TextStreamer


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    ttft_s: float
    stats: RequestStats
    finish_reason: str = "length"  # "eos", "stop" or "length"
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)


class GenerationStream:
    """Iterate for text pieces as they are produced; ``result`` holds the GenerationResult afterwards.

    request: the prefilled request, decoded with its own forward; eos_ids: tokens that end it;
    on_finish(stats, abandoned): called once, when it ends or is closed early. graphs: decode through a CUDA graph
    on CUDA (``engine/decode.py``: Decoder); on_graph_failure(exc): called if capturing one fails.
    """

    def __init__(
        self,
        request: PreparedRequest,
        sampler: Sampler,
        streamer: TextStreamer,
        max_new_tokens: int,
        eos_ids: frozenset[int],
        on_finish: Callable[[RequestStats, bool], None],
        graphs: bool = False,
        on_graph_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._request = request
        self._sampler = sampler
        self._streamer = streamer
        self._max_new = max_new_tokens
        self._eos = eos_ids
        self._on_finish = on_finish
        self._graphs = graphs
        self._decoder: Decoder | None = None
        self._on_graph_failure = on_graph_failure
        self._result: GenerationResult | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating; the tokens so far still count in the engine's metrics."""
        self._pieces.close()

    @property
    def result(self) -> GenerationResult:
        """The finished result (drains the stream first if it was not read to the end)."""
        for _ in self._pieces:
            pass
        assert self._result is not None
        return self._result

    def _run(self) -> Iterator[str]:
        req = self._request
        stats = req.stats
        tokens: list[int] = []
        decode_start = time.perf_counter()
        completed = False
        try:
            finish = yield from self._decode(req, tokens)
            rest = self._streamer.finish()
            if rest:
                yield rest
            completed = True
        finally:
            stats.new_tokens = len(tokens)
            stats.decode_s = time.perf_counter() - decode_start
            stats.graph_steps = self._decoder.graph_steps if self._decoder is not None else 0
            self._request = None  # type: ignore[assignment]  # frees the KV cache
            self._decoder = None  # it holds the cache too (and on CUDA its graph's memory pool)
            if not completed:
                self._on_finish(stats, True)  # closed or failed before the end
        self._result = GenerationResult(
            text=self._streamer.text,
            token_ids=tokens,
            ttft_s=stats.ttft_s,
            stats=stats,
            finish_reason=finish,
            prompt_token_ids=req.prompt_ids,
        )
        self._on_finish(stats, False)

    def _decode(self, req: PreparedRequest, tokens: list[int]) -> Iterator[str]:
        """Yield text pieces while sampling into ``tokens``; return the finish reason."""
        logits = req.logits
        graphs = self._graphs and self._max_new - 1 >= GRAPH_MIN_TOKENS
        decoder = self._decoder = Decoder(req.fwd, req.cache, graphs=graphs, on_graph_failure=self._on_graph_failure)
        for i in range(self._max_new):
            token = self._sampler(logits)
            if i == 0:
                req.stats.ttft_s = time.perf_counter() - req.started
            if token in self._eos:
                return "eos"
            tokens.append(token)
            piece = self._streamer.push(token)
            if piece:
                yield piece
            if self._streamer.done:
                return "stop"
            if i + 1 == self._max_new:
                break
            with torch.inference_mode():
                logits = decoder(token)
        return "length"
