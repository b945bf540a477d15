"""One request decoded in a batch: its prefill a few layers at a time, then its sequence in a RunningBatch, then its
GenerationResult.

``BatchRequest`` is what a batching loop (engine/batch_loop.py) holds for each request. ``prefill(budget)`` runs the
engine's prefill (``engine.prepare_steps``) for a budget of rows x layers; ``join(batch)`` copies the prefilled cache
into a RunningBatch with the request's own Sampler and TextStreamer, whose steps then decode it with the others;
``finish()`` notes its tokens and times in its RequestStats and records them in the engine's metrics, as a
GenerationStream (engine/request.py) does for a request decoded alone. The tokens, text, finish reason and usage are
the ones ``engine.generate`` gives (tests/engine/test_batch_generate.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..store import ChunkHandle
from .generation import GenerationResult
from .running_batch import BatchSequence, RunningBatch
from .sampling import Sampler, SamplingParams
from .segments import TokenRun
from .text_stream import TextStreamer


class BatchRequest:
    """One request of ``engine``, given as ``engine.generate`` takes it (segments, ``prompt=``, ``messages=`` or
    ``blocks=``; ``config``, ``sampling`` or its fields as keywords, ``scope``). Its prompt is tokenized here; its
    prefill runs only when stepped."""

    def __init__(
        self,
        engine,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        blocks: list[TokenRun] | None = None,
        config=None,
        sampling: SamplingParams | None = None,
        scope: str | None = None,
        **options,
    ) -> None:
        self.engine = engine
        self.sampling = SamplingParams.of(sampling, options)
        if blocks is None:
            blocks = engine.blocks(segments, prompt, messages=messages, scope=scope)
        elif segments is not None or prompt is not None or messages is not None:
            raise ValueError("pass blocks=... alone: they already hold the prompt")
        self.prompt_tokens = blocks[-1].end
        room = max(engine.context_window - self.prompt_tokens, 1)  # as engine.stream clamps it
        self.max_new_tokens = min(self.sampling.max_new_tokens, room)
        self.prefill_work = 0  # rows x layers computed so far
        self.graph_steps = 0  # decoding steps replayed from a CUDA graph (counted by the pool)
        self.seq: BatchSequence | None = None
        self._steps = engine.prepare_steps(blocks=blocks, config=config, scope=scope)
        self._prepared = None  # the PreparedRequest, from the end of the prefill until it joins a batch
        self._stats = None
        self._started = self._joined_at = 0.0
        self._prompt_ids: list[int] = []
        self._result: GenerationResult | None = None
        self.ended = False
        self.stopping = False  # stop() was called: the loop drops it at its next step

    @property
    def rows(self) -> int:
        """KV rows its sequence may fill: the prompt and every new token but the last (never fed back)."""
        return self.prompt_tokens + self.max_new_tokens - 1

    @property
    def work(self) -> int:
        """An upper bound of its prefill's rows x layers (every prompt row through every layer)."""
        return self.prompt_tokens * self.engine.model_forward.n_layers

    @property
    def prefilled(self) -> bool:
        return self._steps is None

    def stop(self) -> None:
        """Ask the loop that steps this request to drop it at its next step (from any thread)."""
        self.stopping = True

    def prefill(self, budget: int | None = None) -> bool:
        """Run the prefill for at least one layer, then on until ``budget`` rows x layers are computed (None: to its
        end). Returns True once the prefill has ended. Its errors (a bad request) are raised."""
        if self._steps is None:
            return True
        spent = 0
        while budget is None or spent < budget:
            try:
                rows = next(self._steps)
            except StopIteration as done:
                self._steps = None
                self._prepared = done.value
                self._stats, self._started = done.value.stats, done.value.started
                self._prompt_ids = done.value.prompt_ids
                return True
            spent += rows
            self.prefill_work += rows
        return False

    def join(self, batch: RunningBatch) -> BatchSequence:
        """Add the prefilled request to ``batch``: it gets its first token at the batch's next step."""
        if self._prepared is None:
            raise RuntimeError("a request joins a batch once its prefill has ended, and only once")
        prepared, self._prepared = self._prepared, None  # its cache is copied into the batch's pool, then dropped
        self.seq = batch.add(
            prepared.cache,
            prepared.logits,
            Sampler(self.sampling),
            TextStreamer(self.engine.tokenizer, self.sampling.stop),
            self.max_new_tokens,
            self.engine.eos_token_ids,
        )
        self._joined_at = time.perf_counter()
        return self.seq

    def finish(self) -> None:
        """Its sequence ended (or it was dropped): note its decoding in its stats and record the request in the
        engine's metrics, abandoned if it did not end by itself. A request dropped before its prefill ended has no
        stats yet and is not recorded (as one that left the queue)."""
        if self.ended:
            return
        self.ended = True
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        self._prepared = None
        stats, seq = self._stats, self.seq
        if stats is None:
            return
        abandoned = seq is None or seq.finish_reason in (None, "cancelled")
        if seq is not None:
            stats.new_tokens = len(seq.tokens)
            if seq.first_token_at is not None:
                stats.ttft_s = seq.first_token_at - self._started
            stats.decode_s = time.perf_counter() - self._joined_at
            stats.graph_steps = self.graph_steps
        if not abandoned:
            self._result = GenerationResult(
                text=seq.text,
                token_ids=list(seq.tokens),
                ttft_s=stats.ttft_s,
                stats=stats,
                finish_reason=seq.finish_reason,
                prompt_token_ids=self._prompt_ids,
            )
        self.engine._metrics.record(stats, abandoned)  # the counters GenerationStream records into

    @property
    def result(self) -> GenerationResult:
        """The GenerationResult of a request that ended by itself (EOS, a stop string or its token limit)."""
        if self._result is None:
            state = "was stopped before its end" if self.ended else "has not ended yet"
            raise RuntimeError(f"this request {state}: it has no result")
        return self._result
