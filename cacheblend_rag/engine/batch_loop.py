"""Continuous batching with chunked prefill: the step a batching scheduler repeats.

``BatchLoop.step()`` is one iteration. It runs ``prefill_budget`` rows x layers (at least one layer) of the prefill
in flight, moves a request whose prefill ended into the decode batch (engine/decode_pool.py), then runs one
batched decoding step: a token for every running sequence, picked from the last logits (its pieces can be sent
at once), then the forward that computes the next ones. A running stream therefore waits at most one budget of
prefill between two of its tokens, however long the prompts that arrive; a lone request's prefill runs in budget
steps back to back (nothing is decoding), as fast as in one piece.

Admission (``admissible``, then ``admit``): a request is admitted when its KV rows (prompt and max_new_tokens) fit
the pool's memory budget together with the running and admitted requests (``DecodePool.fits``) and a prefill slot
is free. One prefill runs at a time, in admission order; a short request (its whole prefill under one budget) may
overtake a long prefill in flight, but only every other step: the long one gets at least half of the steps (its
share) until it ends, and a short one waits at most one step of it.

A request is stopped from any thread with ``request.stop()``; the loop drops it at its next step (before its
decoding step), so it computes nothing more.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .batch_request import BatchRequest
from .decode_pool import DecodePool

PREFILL_ROWS = 32  # default budget per step: this many prompt rows through every layer (docs/SERVE.md)
KV_MEMORY_SHARE = 0.2  # default KV budget: this share of the device's memory (RAM on a CPU)


def device_memory(device: torch.device) -> int:
    """Total bytes of memory of ``device`` (the machine's RAM for a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget(kv_memory: int | float | None, device: torch.device) -> int:
    """Bytes of KV memory: ``kv_memory`` bytes (an int > 1), a share of the device's memory (a float in (0, 1]),
    or None: KV_MEMORY_SHARE of it."""
    if kv_memory is None:
        kv_memory = KV_MEMORY_SHARE
    if isinstance(kv_memory, bool) or not isinstance(kv_memory, (int, float)) or not kv_memory > 0:
        raise ValueError(f"kv_memory must be a number of bytes or a share in (0, 1] of the memory, got {kv_memory!r}")
    if isinstance(kv_memory, float):
        if kv_memory > 1:
            raise ValueError(f"kv_memory as a share of the memory must be in (0, 1], got {kv_memory}")
        return int(kv_memory * device_memory(device))
    return kv_memory


@dataclass
class StepEvents:
    """What one step did: ``joined``: prefills that ended (their requests now decode; their first token is among
    ``pieces`` from the same step on); ``pieces``: (request, text piece) in order; ``ended``: requests that finished
    (their ``result`` is ready); ``stopped``: requests dropped by ``stop()``; ``failed``: (request, error)."""

    joined: list[BatchRequest] = field(default_factory=list)
    pieces: list[tuple[BatchRequest, str]] = field(default_factory=list)
    ended: list[BatchRequest] = field(default_factory=list)
    stopped: list[BatchRequest] = field(default_factory=list)
    failed: list[tuple[BatchRequest, BaseException]] = field(default_factory=list)


class BatchLoop:
    """Batched requests of ``engine``: at most ``max_batch`` decoding together, their KV within ``kv_memory`` (bytes,
    or a share of the device's memory), ``prefill_budget`` rows x layers of prefill per step (default PREFILL_ROWS
    rows through every layer). ``before_decode()``, if set, runs before each decoding step (to trace or pace it)."""

    def __init__(
        self,
        engine,
        *,
        max_batch: int = 16,
        kv_memory: int | float | None = None,
        prefill_budget: int | None = None,
        before_decode: Callable[[], None] | None = None,
    ) -> None:
        fwd = engine.model_forward.with_backend(engine.default_config.backend)
        budget = kv_budget(kv_memory, fwd.device)
        said = weakref.WeakMethod(engine._graph_failed)  # held weakly: a loop does not keep its engine alive

        def graph_failed(exc: BaseException) -> None:
            method = said()
            if method is not None:
                method(exc)

        self.pool = DecodePool(fwd, max_batch, budget, graphs=engine.cuda_graphs, on_graph_failure=graph_failed)
        if prefill_budget is None:
            prefill_budget = PREFILL_ROWS * fwd.n_layers
        if isinstance(prefill_budget, bool) or not isinstance(prefill_budget, int) or prefill_budget < 1:
            raise ValueError(f"prefill_budget must be an int >= 1 (rows x layers per step), got {prefill_budget!r}")
        self.prefill_budget = prefill_budget
        self.before_decode = before_decode
        self.prefilling: list[BatchRequest] = []  # admitted, prefill not ended: [first] or [first, short one]
        self._overtaken = False  # the last prefill step went to a short request, not to the first one

    @property
    def busy(self) -> bool:
        """Anything to compute: a prefill in flight or a sequence decoding."""
        return bool(self.prefilling) or len(self.pool) > 0

    @property
    def requests(self) -> list[BatchRequest]:
        """Every admitted request: prefilling, then decoding."""
        return [*self.prefilling, *self.pool.requests]

    def is_short(self, request: BatchRequest) -> bool:
        """Whether ``request``'s whole prefill ends within one step's budget."""
        return request.work < self.prefill_budget

    def check(self, request: BatchRequest) -> None:
        """Raise ValueError if ``request`` could never be decoded within the KV budget (even alone)."""
        self.pool.check(request)

    def admissible(self, request: BatchRequest) -> bool:
        """Whether ``request`` would be admitted now (see the module)."""
        if not self.pool.fits(request.rows, [r.rows for r in self.prefilling]):
            return False
        if not self.prefilling:
            return True
        first = self.prefilling[0]
        overtake = len(self.prefilling) == 1 and not self.is_short(first) and self.is_short(request)
        return overtake and not self._overtaken

    def admit(self, request: BatchRequest) -> None:
        """Start ``request``'s prefill (its first step runs at the next ``step``)."""
        if not self.admissible(request):
            raise RuntimeError("admit a request only when admissible() says so")
        self.prefilling.append(request)

    def step(self) -> StepEvents:
        """One iteration: ``prefill_step``, ``decode_step`` and ``forward_step``, their events together (a caller that
        streams calls them one by one, sending the pieces before the forward)."""
        events = self.prefill_step()
        later = self.decode_step()
        for name in ("joined", "pieces", "ended", "stopped", "failed"):
            getattr(events, name).extend(getattr(later, name))
        events.failed += self.forward_step().failed
        return events

    def prefill_step(self) -> StepEvents:
        """A budget of prefill; a request whose prefill ended joins the decode batch (``joined``)."""
        events = StepEvents()
        self._drop_stopped(events)
        request = self._next_prefill()
        if request is not None:
            self._prefill(request, events)
        return events

    def decode_step(self) -> StepEvents:
        """One decoding step: a token for every running sequence (nothing if none runs), picked from the logits of
        the last forward (or of its prefill). Call ``forward_step`` next."""
        events = StepEvents()
        if len(self.pool):
            self._decode(events)
        return events

    def forward_step(self) -> StepEvents:
        """The batched forward of the tokens ``decode_step`` picked; if it fails, every request in the batch does."""
        events = StepEvents()
        try:
            self.pool.forward()
        except Exception as exc:  # the batch's state is unknown after a failed step
            events.failed += [(request, exc) for request in self.pool.fail_all()]
        return events

    def stop_all(self) -> list[BatchRequest]:
        """Drop every admitted request now (they are recorded as abandoned); returns them."""
        dropped = self.requests
        for request in self.prefilling:
            request.finish()
        self.prefilling = []
        for request in list(self.pool.requests):
            self.pool.cancel(request)
        return dropped

    def _next_prefill(self) -> BatchRequest | None:
        """The request whose prefill gets this step: a short one overtaking the first, every other step."""
        if len(self.prefilling) > 1 and not self._overtaken:
            self._overtaken = True
            return self.prefilling[1]
        self._overtaken = False
        return self.prefilling[0] if self.prefilling else None

    def _prefill(self, request: BatchRequest, events: StepEvents) -> None:
        try:
            done = request.prefill(self.prefill_budget)
            if done:
                self.prefilling.remove(request)
                self.pool.join(request)
                events.joined.append(request)
        except Exception as exc:  # a bad request (its chunk, its config) or no memory: it alone fails
            if request in self.prefilling:
                self.prefilling.remove(request)
            request.finish()
            events.failed.append((request, exc))

    def _decode(self, events: StepEvents) -> None:
        try:
            if self.before_decode is not None:
                self.before_decode()
                self._drop_stopped(events)
            pieces, ended = self.pool.sample()
        except Exception as exc:  # the batch's state is unknown after a failed step: every request in it fails
            events.failed += [(request, exc) for request in self.pool.fail_all()]
            return
        events.pieces += pieces
        events.ended += ended

    def _drop_stopped(self, events: StepEvents) -> None:
        for request in [r for r in self.prefilling if r.stopping]:
            self.prefilling.remove(request)
            request.finish()
            events.stopped.append(request)
        for request in [r for r in self.pool.requests if r.stopping]:
            self.pool.cancel(request)
            events.stopped.append(request)
