"""Several requests generated together: ``engine.generate_batch`` (the framework integrations' batch paths use it).

Each request is prefilled, in order, and decoded in one batch with the others (engine/batch_loop.py: continuous
batching, chunked prefill, admission by KV memory): a request joins as soon as its prefill ends and there is room,
and leaves when it ends, so a short answer does not wait for a long one. Greedy results are the ones
``engine.generate`` gives one request at a time (in float32 exactly: tests/engine/test_batch_generate.py; in bf16
within its rounding, as the batched and the one-request kernels round differently).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence

from .batch_loop import BatchLoop
from .batch_request import BatchRequest
from .generation import GenerationResult
from .sampling import SamplingParams

REQUEST_KEYS = ("segments", "prompt", "messages", "blocks", "config", "sampling", "scope")


def batch_requests(
    engine, requests: Sequence[str | Mapping], defaults: Mapping[str, object]
) -> list[BatchRequest | BaseException]:
    """One BatchRequest per request (a prompt string, or a mapping of REQUEST_KEYS over ``defaults``), or the error
    that made it (its prompt did not tokenize, a chunk is unknown, ...)."""
    out: list[BatchRequest | BaseException] = []
    for i, request in enumerate(requests):
        if isinstance(request, str):
            request = {"prompt": request}
        if not isinstance(request, Mapping):
            raise TypeError(f"requests[{i}] must be a prompt string or a mapping of {REQUEST_KEYS}, got {request!r}")
        unknown = sorted(set(request) - set(REQUEST_KEYS))
        if unknown:
            raise TypeError(f"requests[{i}] has unknown key(s) {unknown}; a request takes {', '.join(REQUEST_KEYS)}")
        try:
            out.append(BatchRequest(engine, **{**defaults, **request}))
        except Exception as exc:
            out.append(exc)
    return out


class BatchGeneration:
    """Iterate for (index, text piece) as the batch produces them, request ``index`` of ``requests``; ``results``
    afterwards; ``close()`` (or leaving the iteration early) stops every request. Arguments: see generate_batch."""

    def __init__(
        self,
        engine,
        requests: Sequence[str | Mapping],
        *,
        config=None,
        sampling: SamplingParams | None = None,
        scope: str | None = None,
        max_batch: int = 16,
        kv_memory: int | float | None = None,
        prefill_budget: int | None = None,
        return_exceptions: bool = False,
        **options,
    ) -> None:
        defaults = {"config": config, "sampling": SamplingParams.of(sampling, options), "scope": scope}
        self._made = batch_requests(engine, requests, defaults)
        self._loop = BatchLoop(engine, max_batch=max_batch, kv_memory=kv_memory, prefill_budget=prefill_budget)
        self._return_exceptions = return_exceptions
        self._errors: dict[int, BaseException] = {
            i: r for i, r in enumerate(self._made) if isinstance(r, BaseException)
        }
        self._pieces = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    @property
    def results(self) -> list[GenerationResult | BaseException]:
        """The results in order (runs the batch to its end first); a failed request's error is raised, or with
        ``return_exceptions`` takes its place."""
        for _ in self._pieces:
            pass
        if self._errors and not self._return_exceptions:
            raise self._errors[min(self._errors)]
        return [
            r if isinstance(r, BaseException) else self._errors.get(i) or r.result for i, r in enumerate(self._made)
        ]

    def _run(self) -> Iterator[tuple[int, str]]:
        loop, errors = self._loop, self._errors
        index = {id(r): i for i, r in enumerate(self._made) if isinstance(r, BatchRequest)}
        pending = deque(r for r in self._made if isinstance(r, BatchRequest))
        try:
            while (pending or loop.busy) and (self._return_exceptions or not errors):
                while pending and loop.admissible(pending[0]):
                    loop.admit(pending.popleft())
                if pending and not loop.busy:  # then it fits unless it is too large for the budget even alone
                    try:
                        loop.check(pending[0])
                    except ValueError as exc:
                        errors[index[id(pending.popleft())]] = exc
                        continue
                for step in (loop.prefill_step, loop.decode_step, loop.forward_step):  # pieces before the forward
                    events = step()
                    for request, exc in events.failed:
                        errors[index[id(request)]] = exc
                    for request, piece in events.pieces:
                        yield index[id(request)], piece
        finally:
            loop.stop_all()  # stopped early (closed, an error): the rest is dropped, counted as abandoned


def generate_batch(engine, requests: Sequence[str | Mapping], **kwargs) -> list[GenerationResult | BaseException]:
    """Generate for every request (a prompt string, or a mapping of ``engine.generate``'s keywords: segments,
    prompt, messages, blocks, config, sampling, scope) with up to ``max_batch`` decoding together; returns the
    results in order. ``config``, ``sampling`` (or its fields as keywords) and ``scope`` apply to requests that do not
    set their own. A request that fails raises its error once the others are stopped, or with
    ``return_exceptions=True`` takes its place in the list. kv_memory, prefill_budget: see BatchLoop."""
    return BatchGeneration(engine, requests, **kwargs).results
