"""The chunk KV of one request, across the plans it may take: each chunk is read from the store once, a miss is
computed (and stored) on the request's own kernels, and a chunk whose read failed inside a prefill is computed the
next time the request is planned (``read_failed``), counted as a miss."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.forward import ModelForward
from ..store import ChunkHandle, ChunkKV, ChunkReadError, KVStore, LazyChunk
from .chunk_source import ChunkSource
from .placement import FALLBACK, place_chunks
from .segments import TokenRun


class RequestChunks:
    """What a strategy's plan reads chunks through. source: the engine's ChunkSource; fwd: the request's forward
    (a miss is computed on its kernels); scope: the request's registry scope (it salts prefix_cache's keys)."""

    def __init__(self, source: ChunkSource, fwd: ModelForward, scope: str | None = None) -> None:
        self.source = source
        self.fwd = fwd
        self.scope = scope
        self._known: dict[str, tuple[ChunkKV | LazyChunk, bool]] = {}  # key -> (kv, read from the store)
        self._failed: set[str] = set()  # keys whose read failed inside a prefill: computed from now on

    @property
    def store(self) -> KVStore:
        return self.source.store

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    def place(self, runs: list[TokenRun]) -> tuple[list[TokenRun], int, str | None]:
        """``runs`` with every chunk that may not be reused where it stands computed instead (``placement.py``),
        how many those were, and why the request reuses no chunk at all if that is the reason."""
        ids = [t for r in runs for t in r.token_ids]
        fmt = self.source.keys.prompt_format
        placed, unplaced = place_chunks(runs, fmt.head_end(ids), fmt.is_whitespace)
        fallback = FALLBACK if unplaced and all(r.handle is None for r in placed) else None
        return placed, unplaced, fallback

    def fetch(self, handles: Sequence[ChunkHandle]) -> tuple[list[ChunkKV | LazyChunk], int, int]:
        """The KV of ``handles`` for the prefill, one per handle, and (hits, misses) among them. A chunk in the
        memory tier is a ChunkKV; one in a slow tier (disk, Redis) a LazyChunk whose layers a background thread
        reads while the prefill computes the layers before; a miss, or a chunk whose read failed before, is computed
        and stored here."""
        todo = {h.key: h for h in handles if h.key not in self._known}
        read = [h for key, h in todo.items() if key not in self._failed]
        found = self.store.fetch([h.key for h in read], [h.n_tokens for h in read]) if read else []
        kvs = dict(zip((h.key for h in read), found))
        for key, handle in todo.items():
            kv = kvs.get(key)
            hit = kv is not None
            self._known[key] = (kv if hit else self.source.compute_missing(handle, self.fwd), hit)
        out = [self._known[h.key][0] for h in handles]
        hits = sum(self._known[h.key][1] for h in handles)
        return out, hits, len(handles) - hits

    def read_failed(self, error: ChunkReadError) -> None:
        """A prefill stopped on ``error``: its chunk is computed the next time the request is planned. Raises it
        again if that chunk was already computed (nothing left to do)."""
        if error.key in self._failed or error.key not in self._known:
            raise error
        self._failed.add(error.key)
        del self._known[error.key]
