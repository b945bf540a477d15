"""One decoding step for every sequence of a batch: one forward, whatever their lengths.

``batch_step`` appends token b at position pos[b] of slot b of a ``KVSlots`` pool and returns the next-token
logits of every slot 0..B-1. The projections, the MLP and the logits run on ``[B, hidden]`` rows as they are; the
attention is one call per layer over the pool's view ``[B, Hkv, capacity, D]``, each query over its own slot's
keys 0..pos[b] (``kernels/batch_decode.py``). Like ``engine/decode.py``'s ``step`` it reads nothing on the
device: tokens and positions are device tensors.

``BatchStepper`` keeps the host side (each slot's length) and, on CUDA, captures the step in one CUDA graph per
batch-size bucket (1, 2, 4, 8, ... up to the pool's slots): a batch of n replays the graph of the smallest bucket
>= n, the rows past n padding (``padded_inputs``): a dummy token at position 0 that writes its K/V into the pool's
scratch slot and reads row 0 of a free slot (its output is dropped). Tokens, positions and write slots reach the
graph through one small host-to-device copy per step. If a capture fails it says so once (``on_graph_failure``)
and decodes eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..model.forward import ModelForward
from .kv_slots import KVSlots

logger = logging.getLogger(__name__)


def batch_step(
    fwd: ModelForward,
    slots: KVSlots,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    length: int | None = None,
    write: torch.Tensor | None = None,
) -> torch.Tensor:
    """tokens, pos: [B] int64 on the device (B <= slots.slots; each pos below the capacity): row b is token
    tokens[b] at position pos[b] of slot b, attending to that slot's keys 0..pos[b]. ``write``: [B] the slot each
    row's K/V go to (default: slot b; the scratch slot for a padding row). ``length``: max(pos) + 1 when the host
    knows it (the attention then reads no row past it). -> logits [B, vocab] float32."""
    b = tokens.shape[0]
    fwd = fwd.within(slots.capacity)
    if write is None:
        write = torch.arange(b, device=tokens.device)
    h = fwd.embed(tokens)  # [B, hidden]
    for layer in range(fwd.n_layers):
        q, k, v = fwd.qkv(layer, h, pos)  # q: [Hq, B, D] rotated; k, v: [Hkv, B, D], k before RoPE
        slots.k[write, layer, :, pos] = fwd.rotate(k, pos).transpose(0, 1)  # [B, Hkv, D] at pos[b]
        slots.v[write, layer, :, pos] = v.transpose(0, 1)
        keys, values = slots.k[:b, layer], slots.v[:b, layer]  # [B, Hkv, capacity, D], views of the pool
        attn = fwd.kernels.batch_decode_attention(q, pos, keys, values, fwd.scale, length=length)  # [Hq, B, D]
        h = fwd.finish_layer(layer, h, attn)
    return fwd.logits(h)


def padded_inputs(tokens: Sequence[int], pos: Sequence[int], bucket: int, scratch: int) -> torch.Tensor:
    """[3, bucket] int64 (host): tokens, positions and write slots of a batch of len(tokens) padded to ``bucket``
    rows; a padding row is token 0 at position 0, written to slot ``scratch``."""
    n = len(tokens)
    out = torch.zeros((3, bucket), dtype=torch.long)
    out[0, :n] = torch.tensor(list(tokens), dtype=torch.long)
    out[1, :n] = torch.tensor(list(pos), dtype=torch.long)
    out[2, :n] = torch.arange(n)
    out[2, n:] = scratch
    return out


def buckets(slots: int) -> list[int]:
    """The batch sizes a graph is captured for: powers of two below ``slots``, then ``slots``."""
    sizes = [1]
    while sizes[-1] * 2 < slots:
        sizes.append(sizes[-1] * 2)
    return sizes + ([slots] if slots > 1 else [])


class BatchStepper:
    """Decodes slots 0..n-1 of ``slots`` together: ``stepper(tokens)`` appends ``tokens[i]`` to slot i (n =
    len(tokens) must be ``slots.count``) and returns logits [n, vocab] float32.

    graphs: on CUDA, replay one CUDA graph per batch-size bucket (captured the first time a bucket is used); the
    returned logits are then a view of the graph's output, valid until the next call. Elsewhere every step is
    eager. on_graph_failure(exc): called once if a capture fails (then eager from there on).
    """

    def __init__(
        self,
        fwd: ModelForward,
        slots: KVSlots,
        graphs: bool = False,
        on_graph_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.fwd = fwd
        self.slots = slots
        self.use_graphs = graphs and slots.k.device.type == "cuda"
        self.on_graph_failure = on_graph_failure
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, logits)
        self.graph_steps = 0
        self.buckets = buckets(slots.slots)

    def __call__(self, tokens: Sequence[int]) -> torch.Tensor:
        slots = self.slots
        n = len(tokens)
        if n != slots.count or n == 0:
            raise ValueError(f"{n} tokens for {slots.count} occupied slots: give one token per occupied slot")
        pos = slots.lengths[:n]
        if max(pos) >= slots.capacity:
            raise RuntimeError(f"a KV slot is full at {slots.capacity} rows")
        logits = self._replay(tokens, pos) if self.use_graphs else None
        if logits is None:
            device = slots.k.device
            logits = batch_step(
                self.fwd,
                slots,
                torch.tensor(list(tokens), dtype=torch.long, device=device),
                torch.tensor(pos, dtype=torch.long, device=device),
                length=max(pos) + 1,
            )
        for i in range(n):
            slots.lengths[i] += 1
        return logits

    def _replay(self, tokens: Sequence[int], pos: list[int]) -> torch.Tensor | None:
        """The step through the graph of the bucket of len(tokens) (captured now if new); None to run eagerly."""
        n = len(tokens)
        bucket = next(size for size in self.buckets if size >= n)
        if bucket not in self.graphs:
            self._capture(bucket)
            if not self.use_graphs:
                return None
        self._copied.synchronize()  # the last step's copy has read the pinned buffer (normally long since)
        self._host[:, :bucket] = padded_inputs(tokens, pos, bucket, self.slots.scratch)
        self._io[:, :bucket].copy_(self._host[:, :bucket], non_blocking=True)
        self._copied.record()
        graph, logits = self.graphs[bucket]
        graph.replay()
        self.graph_steps += 1
        return logits[:n]

    def _capture(self, bucket: int) -> None:
        """Capture ``batch_step`` over slots 0..bucket-1. The warm-up runs the step once on the capture stream, on
        padding inputs only (every row writes to the scratch slot), so no sequence's rows change."""
        fwd, slots = self.fwd, self.slots
        device = slots.k.device
        try:
            if not self.graphs:
                # built here, not in the graph, and held: the graphs read them at every replay
                self._rope_tables = fwd.rope.tables(slots.capacity, slots.k.dtype, device)
                self._io = torch.zeros((3, slots.slots), dtype=torch.long, device=device)  # tokens, pos, write
                self._host = torch.zeros((3, slots.slots), dtype=torch.long).pin_memory()
                self._copied = torch.cuda.Event()
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at once
            tokens, pos, write = self._io[0, :bucket], self._io[1, :bucket], self._io[2, :bucket]
            self._io[:, :bucket].copy_(padded_inputs([], [], bucket, slots.scratch))
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                batch_step(fwd, slots, tokens, pos, write=write)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                logits = batch_step(fwd, slots, tokens, pos, write=write)
            self.graphs[bucket] = (graph, logits)
        except Exception as exc:  # an eager step is always correct: fall back to it
            self.use_graphs = False
            self.graphs.clear()
            if self.on_graph_failure is not None:
                self.on_graph_failure(exc)
            else:
                logger.warning("CUDA graph capture failed (%s); decoding eagerly", exc)
