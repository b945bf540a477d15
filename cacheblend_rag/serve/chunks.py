"""``POST /v1/chunks``: precompute and register chunk texts.

Who may register is the registry scope's decision (``access.py``). A request is checked before any model work:
its number of texts (``max_chunk_texts``, before the body is validated), their bytes, then their tokens, counted
off the engine's thread (``max_chunk_tokens``): 413 naming the option; then the caller's quota (``quota.py``):
429. The texts are computed a few at a time, one step per scheduler turn (``ChunkJob``), so decoding requests keep
their turns and a client that leaves stops the job between steps (what was computed before stays stored and
registered). A text already registered in the caller's scope keeps its KV; any other is computed after its
``context`` lexically nearest texts of the request (default 2; 0: alone; ``engine.nearest_contexts``, as
``engine.precompute`` picks them): chunks computed among their nearest passages keep far more of full recompute's
quality under reuse. The limits count the texts' own tokens;
computing a text after k others costs about k + 1 texts' compute.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .completions import watch
from .errors import ApiError, ClientGone, api_error, client_closed, parse_body
from .options import BYTES_PER_TOKEN
from .schemas import ChunksRequest
from .state import ServerState, caller_of, server_state

STEP_TOKENS = 4096  # chunk tokens computed per scheduler turn (at least one text)


class ChunkJob:
    """An iterator the scheduler steps: each ``next`` stores the next group of texts' KV through the engine's public
    ``attach`` (computing what the store lacks, registering them in registry ``scope``) and returns how many texts
    are done.

    handles: one per text, as ``checked_handles`` made them (None: the text alone); sizes: the tokens computing each
    costs (its own and its context's)."""

    def __init__(
        self,
        engine,
        texts: list[str],
        sizes: list[int],
        step_tokens: int = STEP_TOKENS,
        scope: str | None = None,
        handles: list | None = None,
    ) -> None:
        self.engine = engine
        self.scope = scope
        self.handles: list = []
        self.computed = 0
        self._groups: deque[list[tuple[str, object]]] = deque()
        group, tokens = [], 0
        for text, handle, n in zip(texts, handles or [None] * len(texts), sizes):
            if group and tokens + n > step_tokens:
                self._groups.append(group)
                group, tokens = [], 0
            group.append((text, handle))
            tokens += n
        if group:
            self._groups.append(group)

    def __iter__(self) -> ChunkJob:
        return self

    def __next__(self) -> int:
        if not self._groups:
            raise StopIteration
        group = self._groups.popleft()
        before = self.engine.metrics()["precomputed_chunks"]
        texts, handles = [t for t, _ in group], [h for _, h in group]
        self.handles += self.engine.attach(texts, context=0, scope=self.scope, handles=handles)
        self.computed += self.engine.metrics()["precomputed_chunks"] - before
        return len(self.handles)

    def close(self) -> None:
        self._groups.clear()


async def register_chunks(request: Request) -> Response:
    state, caller = server_state(request), caller_of(request)
    try:
        state.access.check_register(caller)
        body = await parse_body(request, ChunksRequest, partial(check_count, state.options.max_chunk_texts))
        scope = state.access.scope_of(caller)
        handles = await checked_handles(state, body, scope)
        charged = state.quota.charge(caller, handles)
    except ClientGone:
        return client_closed().response()
    except Exception as exc:
        return api_error(exc).response()
    sizes = [h.n_tokens + len(h.context_ids) for h in handles]
    job = ChunkJob(state.engine, body.texts, sizes, scope=scope, handles=handles)
    outcome = await run_job(request, state, job)
    if outcome is not None:
        done = {h.key for h in job.handles}
        state.quota.refund(caller, [k for k in charged if k not in done])
        return outcome
    data = [{"object": "chunk", "index": i, "key": h.key, "n_tokens": h.n_tokens} for i, h in enumerate(job.handles)]
    answer = {"object": "list", "model": state.name, "data": data}
    if state.access.sees_reuse(caller):
        answer["computed"] = job.computed
        answer["already_stored"] = len({h.key for h in job.handles}) - job.computed
    return JSONResponse(answer)


async def checked_handles(state: ServerState, body: ChunksRequest, scope: str | None) -> list:
    """The texts' handles (made off the engine's thread), once every limit is checked: the one registered for a
    text in ``scope`` already, else the text computed after its context (``body.context``)."""
    state.check_model(body.model)
    body.check()
    options, engine = state.options, state.engine
    limit = options.max_chunk_tokens
    size = body.text_bytes()
    if size > limit * BYTES_PER_TOKEN:
        raise _too_many_tokens(f"{size} bytes of text, more than {limit} tokens can hold", limit)
    state.scheduler.check_room()
    handles = await state.off_thread(lambda: [engine.handle(t, scope=scope) for t in body.texts])
    tokens = sum(h.n_tokens for h in handles)
    if tokens > limit:
        raise _too_many_tokens(f"{tokens} tokens", limit)
    room = engine.context_window - len(engine.chunk_prefix_ids)
    for i, h in enumerate(handles):
        if h.n_tokens > room:
            raise ApiError(
                400,
                f"texts[{i}] has {h.n_tokens} tokens, more than a chunk can have in the model's context window "
                f"({room} of {engine.context_window}); split it into smaller chunks",
                param=f"texts[{i}]",
            )

    def final() -> list:
        registry = engine.registry_for(scope)
        known = [registry.lookup(t) for t in body.texts]
        contexts = engine.nearest_contexts(body.texts, body.context)
        return [
            h if h is not None else engine.handle(t, scope=scope, context_ids=engine.context_ids(ctx))
            for h, t, ctx in zip(known, body.texts, contexts)
        ]

    return await state.off_thread(final)


def check_count(max_texts: int, data: dict) -> None:
    """413 if ``data`` (the parsed body, checked before it is validated) has more than ``max_texts`` texts."""
    texts = data.get("texts")
    if isinstance(texts, list) and len(texts) > max_texts:
        raise ApiError(
            413,
            f"{len(texts)} texts in one request; this server takes at most {max_texts} (--max-chunk-texts): send "
            "them in several requests",
            code="too_many_texts",
            param="texts",
        )


def _too_many_tokens(what: str, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the texts have {what}; this server takes at most {limit} chunk tokens per request "
        "(--max-chunk-tokens): send them in several requests",
        code="too_many_tokens",
        param="texts",
    )


async def run_job(request: Request, state: ServerState, job: ChunkJob) -> Response | None:
    """Run ``job`` on the scheduler until it ends; None when it finished, else the error response."""
    try:
        ticket = state.scheduler.submit(lambda: job)
    except Exception as exc:  # QueueFull, SchedulerClosed
        return api_error(exc).response()
    watcher = asyncio.create_task(watch(request, ticket))
    try:
        while True:
            kind, value = await ticket.next_event()
            if kind == "end":
                return None
            if kind == "error":
                return api_error(value).response()
            if kind == "cancelled":
                return client_closed().response()
    finally:
        watcher.cancel()
        ticket.cancel()
