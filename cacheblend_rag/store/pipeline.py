"""Layer-pipelined loading (the paper's loading controller): read layer l+1 while the prefill computes layer l.

``KVStore.fetch`` opens every block a request needs from the slow tiers (disk, Redis) and hands the prefill
one ``LazyChunk`` per block. One background thread per request reads the blocks layer-major (layer 0 of
every block, then layer 1, ...), each layer straight into the block's final buffers, as fast as the tier
allows (a tier whose readers have a ``batcher``, like Redis, reads one layer of all its blocks in one round
trip); ``LazyChunk.layer(l)`` returns at once if layer l is in, and otherwise waits for it. When every
layer of a block has been read it is promoted to the faster tiers.

A block whose read fails (corrupt, vanished, tier down, or slower than ``timeout_s`` for one layer) raises
``ChunkReadError`` the first time the prefill asks for a layer that was not read: the engine stops that prefill,
computes the block (a miss) and plans the request again (``engine/prepare.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from .chunk import ChunkKV
from .entry import EntryBuffers, EntryReader, LayerBatcher

logger = logging.getLogger(__name__)


class ChunkReadError(RuntimeError):
    """Reading a stored block failed after the prefill began to use it (corrupt, vanished, tier down, too slow):
    ``key`` and ``tier`` name it, the cause is ``__cause__``. The caller computes the block instead."""

    def __init__(self, key: str, tier: str, cause: BaseException | None) -> None:
        super().__init__(f"reading KV block {key[:12]} from the {tier} tier failed ({cause}); compute it instead")
        self.key, self.tier = key, tier


class LazyChunk:
    """A stored block arriving layer by layer; the prefill uses it like a ChunkKV (``n_tokens``, ``layer``). A layer
    that cannot be read raises ChunkReadError."""

    def __init__(self, key: str, reader: EntryReader, tier: str, timeout_s: float = 30.0) -> None:
        self.key = key
        self.tier = tier
        self.reader = reader
        self.meta = reader.meta
        self.timeout_s = timeout_s
        self._buffers: EntryBuffers | None = None
        self._ready = 0  # layers 0.._ready-1 are in
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    @property
    def n_layers(self) -> int:
        return self.meta.n_layers

    @property
    def failed(self) -> bool:
        return self._error is not None

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s (k, v), [Hkv, T, D] each: waits for the reader; raises ChunkReadError if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready > index or self._error is not None, self.timeout_s):
                self._error = TimeoutError(f"layer {index} of {self.key[:12]} took over {self.timeout_s}s to read")
                logger.warning(
                    "reading KV block %s from the %s tier is too slow (%s); computing it instead",
                    self.key[:12],
                    self.tier,
                    self._error,
                )
            if self._ready > index:
                assert self._buffers is not None
                return self._buffers.k[index], self._buffers.v[index]
            raise ChunkReadError(self.key, self.tier, self._error) from self._error

    def wait(self) -> ChunkKV:
        """Every layer (blocks until read; raises ChunkReadError if the read failed)."""
        self.layer(self.n_layers - 1)
        assert self._buffers is not None
        return self._buffers.kv()

    # ---- called by the loader thread ------------------------------------------------------------------
    def _slots(self, layer: int) -> dict[str, torch.Tensor]:
        if self._buffers is None:
            self._buffers = EntryBuffers(self.meta)
        return self._buffers.slots(layer)

    def _filled(self, layer: int) -> None:
        assert self._buffers is not None
        self._buffers.decode(layer)
        with self._cond:
            self._ready = layer + 1
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _complete(self) -> ChunkKV | None:
        if self._error is not None or self._ready < self.n_layers or self._buffers is None:
            return None
        return self._buffers.kv()


def start_loader(chunks: Sequence[LazyChunk], promote: Callable[[str, ChunkKV], None]) -> threading.Thread:
    """Read ``chunks`` layer-major in a daemon thread; ``promote(key, kv)`` each one read in full."""
    thread = threading.Thread(target=_load, args=(list(chunks), promote), name="cacheblend-kv-loader", daemon=True)
    thread.start()
    return thread


def _load(chunks: list[LazyChunk], promote: Callable[[str, ChunkKV], None]) -> None:
    try:
        for layer in range(max(c.n_layers for c in chunks)):
            batches: dict[int, tuple[LayerBatcher, list[LazyChunk]]] = {}
            for chunk in chunks:
                if chunk.failed or layer >= chunk.n_layers:
                    continue
                batcher = getattr(chunk.reader, "batcher", None)
                if batcher is not None:
                    batches.setdefault(id(batcher), (batcher, []))[1].append(chunk)
                    continue
                try:
                    chunk.reader.read_layer(layer, chunk._slots(layer))
                    chunk._filled(layer)
                except BaseException as exc:  # logged and counted by the tier's reader
                    chunk._fail(exc)
            for batcher, group in batches.values():
                try:
                    errors = batcher.read_layers([(c.reader, c._slots(layer)) for c in group], layer)
                except BaseException as exc:
                    errors = [exc] * len(group)
                for chunk, error in zip(group, errors):
                    if error is None:
                        chunk._filled(layer)
                    else:
                        chunk._fail(error)
    finally:
        for chunk in chunks:
            try:
                chunk.reader.close()
            except Exception as exc:
                logger.debug("closing a KV reader failed: %s", exc)
    for chunk in chunks:
        kv = chunk._complete()
        if kv is None:
            continue
        try:
            promote(chunk.key, kv)
        except Exception as exc:  # the request has its KV; a faster tier just misses it next time
            logger.warning("could not promote KV block %s from the %s tier (%s)", chunk.key[:12], chunk.tier, exc)
