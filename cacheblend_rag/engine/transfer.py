"""Moving data to the model's device without making the host wait: host-built index tensors (``upload``) and the
stored KV of a request's chunks into its fused cache (``StoredKV``).

Where a block's KV is, and what the prefill does with it:

- on the cache's device (the device tier, or any CPU tier when the model runs on the CPU): one copy of every
  layer at once into the fused cache, queued before the layer loop (device to device: no PCIe);
- in pinned host memory, with the model on CUDA (the pinned tier): one copy per layer on a side CUDA stream, all
  queued before the loop, each followed by an event; layer l of the loop waits for event l only, so the copy
  engine brings layer l+1 in while the GPU computes layer l;
- in pageable host memory (a plain memory tier on a CUDA machine): one copy of every layer at once (the driver
  stages pageable copies, so these wait for the host; a pinned tier avoids that);
- arriving layer by layer from disk or Redis (``LazyChunk``): copied as each layer is needed.
"""

from __future__ import annotations

import threading

import torch

from ..store.chunk import ChunkKV
from .kv_cache import KVCache

_streams: dict[torch.device, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor the caller no longer changes) on ``device``. On CUDA the copy goes through pinned memory
    with ``non_blocking=True``, so the host does not wait for it (a pageable copy synchronises the stream)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream host-to-device KV copies run on (one per device, made once)."""
    with _streams_lock:
        stream = _streams.get(device)
        if stream is None:
            stream = _streams[device] = torch.cuda.Stream(device)
        return stream


def streamable(kv: object, cache: KVCache) -> bool:
    """Whether ``kv`` is a block in pinned host memory and ``cache`` on CUDA: copied layer by layer on a side stream."""
    return (
        isinstance(kv, ChunkKV)
        and cache.k.device.type == "cuda"
        and kv.k.device.type == "cpu"
        and kv.k.is_pinned()
        and kv.v.is_pinned()
    )


class StoredKV:
    """Puts the stored pre-RoPE K/V of ``spans`` (CachedSpan: start, kv) into ``cache``; ``layer(l)`` makes sure
    layer l's rows are there before the prefill reads them. Nothing here reads a device value on the host."""

    def __init__(self, spans, cache: KVCache) -> None:
        self.cache = cache
        self.lazy = []  # spans still arriving from a slow tier: copied per layer
        self.events: list[torch.cuda.Event] | None = None
        streamed = []
        for span in spans:
            if not isinstance(span.kv, ChunkKV):
                self.lazy.append(span)
            elif streamable(span.kv, cache):
                streamed.append(span)
            else:  # every layer at once: [L, Hkv, T, D]
                cache.k[:, :, span.start : span.end].copy_(span.kv.k, non_blocking=True)
                cache.v[:, :, span.start : span.end].copy_(span.kv.v, non_blocking=True)
        if streamed:
            self._stream(streamed)

    def _stream(self, spans) -> None:
        cache, device = self.cache, self.cache.k.device
        main = torch.cuda.current_stream(device)
        side = copy_stream(device)
        side.wait_stream(main)  # the cache was made (and maybe written) on the main stream
        self.events = []
        with torch.cuda.stream(side):
            for layer in range(cache.k.shape[0]):
                for span in spans:
                    cache.k[layer, :, span.start : span.end].copy_(span.kv.k[layer], non_blocking=True)
                    cache.v[layer, :, span.start : span.end].copy_(span.kv.v[layer], non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
                self.events.append(event)
        cache.k.record_stream(side)  # the allocator must not reuse the cache's memory before the side stream is done
        cache.v.record_stream(side)

    def layer(self, layer: int) -> None:
        """Layer ``layer`` of every span is in the cache (for the main stream) once this returns."""
        if self.events is not None:
            torch.cuda.current_stream(self.cache.k.device).wait_event(self.events[layer])
        if self.lazy:
            keys, values = self.cache.k[layer], self.cache.v[layer]  # [Hkv, capacity, D]
            for span in self.lazy:
                k_stored, v_stored = span.kv.layer(layer)  # [Hkv, T, D], k before RoPE
                keys[:, span.start : span.end].copy_(k_stored, non_blocking=True)
                values[:, span.start : span.end].copy_(v_stored, non_blocking=True)
