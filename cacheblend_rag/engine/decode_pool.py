"""The decode batch of an engine's batched requests, its KV memory held within a budget.

``DecodePool`` holds one RunningBatch (engine/running_batch.py) and sizes its KV pool. A pool's slots all have one
capacity (engine/kv_slots.py: one strided view per layer for the batched attention), so the pool is made for the
longest sequence it holds, rounded up to a power of two rows (at least ``MIN_CAPACITY``), with ``max_batch`` slots,
or fewer when that many (plus the pool's scratch slot) would pass ``kv_memory`` bytes. When a longer sequence joins,
the pool is made again larger and the running sequences are copied into it (for that moment both pools exist). It is
never made smaller while sequences run (its memory stays within the budget, and a decoding step reads only the
rows in use), but a pool larger than ``MIN_CAPACITY`` rows is dropped when its last sequence leaves: after a long
request, the next short ones get a pool of their own size, with all ``max_batch`` slots the budget allows.

Admission asks ``fits(rows, admitted)``: whether a sequence of ``rows`` KV rows (prompt and new tokens) has a slot
once the running sequences and those already admitted (``admitted``: their rows) have theirs. A sequence too long to
ever fit alone is refused by ``check``, naming the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..model.forward import ModelForward
from .batch_request import BatchRequest
from .kv_slots import KVSlots
from .running_batch import RunningBatch

MIN_CAPACITY = 256  # rows: pools of short sequences are not remade for every few more tokens


class DecodePool:
    """Decodes up to ``max_batch`` BatchRequests together, in a KV pool of at most ``kv_memory`` bytes, on ``fwd``."""

    def __init__(
        self,
        fwd: ModelForward,
        max_batch: int,
        kv_memory: int,
        *,
        graphs: bool = False,
        on_graph_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if isinstance(kv_memory, bool) or not isinstance(kv_memory, int) or kv_memory < 1:
            raise ValueError(f"kv_memory must be a number of bytes >= 1, got {kv_memory!r}")
        self.fwd, self.max_batch, self.kv_memory = fwd, max_batch, kv_memory
        self.graphs, self.on_graph_failure = graphs, on_graph_failure
        self.row_bytes = KVSlots.slot_bytes(fwd, 1)  # one row of one slot, all layers, K and V
        self.batch: RunningBatch | None = None
        self.requests: list[BatchRequest] = []  # in the batch, in no particular order

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def capacity(self) -> int:
        """Rows per slot of the pool as it is now (0: no pool yet)."""
        return self.batch.slots.capacity if self.batch is not None else 0

    @staticmethod
    def capacity_for(rows: int) -> int:
        """The slot capacity a pool holding a sequence of ``rows`` rows gets: a power of two >= MIN_CAPACITY."""
        capacity = MIN_CAPACITY
        while capacity < rows:
            capacity *= 2
        return capacity

    def slots_for(self, capacity: int) -> int:
        """Slots a pool of ``capacity`` rows per slot has within the budget (one more, the scratch slot, is paid)."""
        return min(self.max_batch, self.kv_memory // (capacity * self.row_bytes) - 1)

    def fits(self, rows: int, admitted: Sequence[int] = ()) -> bool:
        """Whether a sequence of ``rows`` KV rows may be admitted now, after those of ``admitted`` rows."""
        capacity = self.capacity_for(max(rows, *admitted, self.capacity))
        return len(self.requests) + len(admitted) + 1 <= self.slots_for(capacity)

    def check(self, request: BatchRequest) -> None:
        """Raise ValueError if ``request`` could not be decoded even alone within the budget."""
        capacity = self.capacity_for(request.rows)
        if self.slots_for(capacity) < 1:
            need = 2 * capacity * self.row_bytes
            raise ValueError(
                f"a prompt of {request.prompt_tokens} tokens with max_new_tokens={request.max_new_tokens} needs "
                f"{need} bytes of KV memory (two slots of {capacity} rows: its own and the pool's scratch slot); "
                f"the budget is {self.kv_memory} bytes: raise kv_memory or lower max_new_tokens"
            )

    def join(self, request: BatchRequest) -> None:
        """Add a prefilled request (it must fit: ``fits``), making the pool larger first if it needs to be."""
        capacity = self.capacity_for(max(request.rows, self.capacity))
        if self.batch is None or capacity > self.capacity:
            self._remake(capacity)
        assert self.batch is not None
        if self.batch.free_slots == 0:
            raise RuntimeError(f"all {len(self.requests)} slots of the decode batch are taken; admit by fits()")
        request.join(self.batch)
        self.requests.append(request)

    def sample(self) -> tuple[list[tuple[BatchRequest, str]], list[BatchRequest]]:
        """A token for every request: (request, text piece) in order, and the requests that ended (finished and
        recorded, out of the pool). Then ``forward`` (before the next ``sample`` or ``join``)."""
        if self.batch is None or not self.requests:
            return [], []
        owner = {id(r.seq): r for r in self.requests}
        events = self.batch.sample()
        pieces = [(owner[id(seq)], piece) for seq, piece in events]
        ended = [r for r in self.requests if r.seq is not None and r.seq.done]
        for request in ended:
            self.requests.remove(request)
            request.finish()
        self._release_if_empty()
        return pieces, ended

    def forward(self) -> None:
        """The batched forward of the tokens ``sample`` picked (the next logits of every request)."""
        if self.batch is None:
            return
        graphed = self.batch.stepper.graph_steps
        self.batch.forward()
        if self.batch.stepper.graph_steps > graphed:
            for request in self.requests:
                request.graph_steps += 1

    def cancel(self, request: BatchRequest) -> None:
        """Stop a request of the pool now (its slot is freed) and record it as abandoned."""
        if request in self.requests:
            assert self.batch is not None and request.seq is not None
            self.batch.cancel(request.seq)
            self.requests.remove(request)
            self._release_if_empty()
        request.finish()

    def _release_if_empty(self) -> None:
        """Drop an empty pool made larger than the smallest (a long sequence's): the next one is sized for its own."""
        if not self.requests and self.capacity > MIN_CAPACITY:
            self.batch = None

    def fail_all(self) -> list[BatchRequest]:
        """Drop every request (a decoding step failed: the pool's state is unknown) and the pool; returns them."""
        dropped, self.requests = self.requests, []
        self.batch = None
        for request in dropped:
            request.finish()
        return dropped

    def _remake(self, capacity: int) -> None:
        """A new pool of ``capacity`` rows per slot; the running sequences are copied into it."""
        slots = self.slots_for(capacity)
        if slots < max(1, len(self.requests)):
            raise RuntimeError(f"a pool of {capacity} rows per slot holds {slots} sequences within the budget")
        new = RunningBatch(self.fwd, slots, capacity, graphs=self.graphs, on_graph_failure=self.on_graph_failure)
        old, self.batch = self.batch, new
        if old is not None:
            for i, seq in enumerate(old.sequences):  # slot order: slot i holds sequence i
                if seq.logits is not None:
                    seq.logits = seq.logits.clone()  # on CUDA a view of the old graph's output
                new.adopt(seq, old.slots.cache(i))
