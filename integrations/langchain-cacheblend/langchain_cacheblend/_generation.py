"""One engine request as LangChain needs it: per-call options, timeout and retries; and several at once.

Async callers iterate a Generation through the core's thread bridge (``cacheblend_rag.engine.aio``), as the
LlamaIndex integration does: a consumer that stops early (a closed or cancelled stream) stops the decoding
after the token it is on, and the engine's stream is closed. ``Generation.batched()`` runs the request in the
engine's shared batch instead (``cacheblend_rag.engine.batch_worker``): the chat model's ``batch``/``abatch`` calls
decode together. ``timed(...)`` bounds a BatchGeneration (the plain LLM's prompts of one call, decoded together).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine, GenerationResult, GenerationStream, SamplingParams
from cacheblend_rag.engine.batch_generate import BatchGeneration
from cacheblend_rag.engine.batch_request import BatchRequest
from cacheblend_rag.engine.batch_worker import batch_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """Everything one request needs besides its prompt (instance defaults merged with per-call overrides)."""

    sampling: SamplingParams
    config: BlendConfig
    timeout: float | None
    max_retries: int


class Generation:
    """Iterate for the text pieces of one request; ``result`` holds the engine's GenerationResult afterwards.

    ``timeout`` bounds the whole request: it is checked after the prefill and after every piece, and raises
    TimeoutError (the prefill itself cannot be interrupted). ``max_retries`` retries a prefill that ran out of
    accelerator memory (``torch.OutOfMemoryError``: concurrent requests can hold memory for a moment); other
    errors are bad input or bugs and are raised at once.
    """

    def __init__(self, engine: CacheBlendEngine, prompt: str | list[dict[str, str]], options: Options) -> None:
        self.engine = engine
        self.prompt = prompt  # a prompt string (sent as is) or chat messages (the engine applies the chat template)
        self.options = options
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        started = time.monotonic()
        stream = self._start()
        try:
            self._check_deadline(started, 0)
            for n, piece in enumerate(stream, start=1):
                yield piece
                self._check_deadline(started, n)
            self.result = stream.result
        finally:
            stream.close()  # stopped early (the consumer left, a timeout): the engine stops decoding now

    def run(self) -> GenerationResult:
        """Generate to the end and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def batched(self) -> Iterator[str]:
        """Like iterating, but decoded in the engine's shared batch: requests made at once share each decoding step
        (a prefill that runs out of memory fails the request: no retry there)."""
        opts = self.options
        started = time.monotonic()
        request = BatchRequest(self.engine, **self._text(), sampling=opts.sampling, config=opts.config)
        handle = batch_worker(self.engine).submit(request)
        try:
            for n, piece in enumerate(handle, start=1):
                yield piece
                self._check_deadline(started, n)
            self.result = handle.result
        finally:
            handle.close()  # stopped early: the batch drops the request at its next step

    def _text(self) -> dict:
        return {"prompt": self.prompt} if isinstance(self.prompt, str) else {"messages": self.prompt}

    def _start(self) -> GenerationStream:
        opts = self.options
        for attempt in range(opts.max_retries + 1):
            try:
                return self.engine.stream(**self._text(), sampling=opts.sampling, config=opts.config)
            except torch.OutOfMemoryError:
                if attempt == opts.max_retries:
                    raise
                logger.warning("out of memory in the prefill; retry %d of %d", attempt + 1, opts.max_retries)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        raise AssertionError("unreachable")

    def _check_deadline(self, started: float, pieces: int) -> None:
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - started > timeout:
            raise TimeoutError(
                f"generation exceeded timeout={timeout}s after {pieces} text piece(s); "
                "raise timeout, lower max_tokens, or pass timeout=None for no limit"
            )


def timed(batch: BatchGeneration, timeout: float | None) -> Iterator[tuple[int, str]]:
    """The (prompt index, piece) of ``batch``, stopping it with TimeoutError past ``timeout`` seconds in all."""
    started = time.monotonic()
    try:
        for n, item in enumerate(batch, start=1):
            yield item
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"a batch of requests exceeded timeout={timeout}s after {n} text piece(s); raise timeout, "
                    "lower max_tokens, send fewer prompts at once, or pass timeout=None for no limit"
                )
    finally:
        batch.close()
