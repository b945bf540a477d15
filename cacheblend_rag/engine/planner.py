"""From a request's token blocks and its BlendConfig to a PrefillPlan (which rows are cached, which are
computed, where cacheblend checks), fetching the stored KV it needs from the chunk source."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import BlendConfig
from ..store import ChunkKV, KVStore, chain_key
from ..store.keys import scope_root
from .chunks import ChunkSource, kv_rows
from .prefill import CachedSpan, PrefillPlan
from .segments import Block
from .selection import Budget
from .stats import RequestStats
from .transfer import upload


@dataclass
class PrefixBlocks:
    """Blocks a prefix_cache request computed and stores for later requests: (key, start, end) each."""

    entries: list[tuple[str, int, int]]
    offset: int  # first captured row

    def store(self, store: KVStore, captured: ChunkKV) -> None:
        """Put each block's rows of ``captured`` (the prefill's captured K/V, from row ``offset``) in ``store``."""
        for key, start, end in self.entries:
            a, b = start - self.offset, end - self.offset
            store.put(key, ChunkKV(captured.k[:, :, a:b].clone(), captured.v[:, :, a:b].clone()))


def plan_request(
    blocks: list[Block], config: BlendConfig, chunks: ChunkSource, stats: RequestStats, scope: str | None = None
) -> tuple[PrefillPlan, PrefixBlocks | None]:
    """The plan of a request (and, for prefix_cache, the blocks to store after its prefill, under keys salted with
    the registry ``scope``)."""
    device = chunks.device
    host_ids = torch.tensor([t for b in blocks for t in b.token_ids], dtype=torch.long)  # [N]
    ids = upload(host_ids, device)
    n = ids.shape[0]
    if config.strategy == "full_recompute":
        return PrefillPlan(ids=ids), None
    if config.strategy == "prefix_cache":
        return prefix_plan(ids, blocks, chunks, stats, scope)
    t = time.perf_counter()
    cached = [b for b in blocks if b.handle is not None]
    # chunks in a slow tier arrive layer by layer while the prefill runs (store/pipeline.py)
    kvs = chunks.fetch([b.handle for b in cached], stats)
    spans = [CachedSpan(b.start, kv_rows(kv, b.offset, len(b.token_ids))) for b, kv in zip(cached, kvs)]
    stats.load_s = time.perf_counter() - t
    # built on the host, so the counts the layer loop needs are known without reading the device
    forced = torch.ones(n, dtype=torch.bool)  # [N]: the rows a check layer must keep
    from_cache = torch.zeros(n, dtype=torch.bool)
    for span in spans:
        forced[span.start + config.recompute_chunk_head : span.end] = False
        from_cache[span.start : span.end] = True
    forced[n - 1] = True
    counts = (int(forced.sum()), int((forced & from_cache).sum()))
    forced_rows = upload(forced.nonzero().squeeze(1), device)  # [F] sorted
    forced = upload(forced, device)
    stats.cached_tokens = sum(s.kv.n_tokens for s in spans)
    if config.strategy == "full_reuse":
        return PrefillPlan(ids=ids, spans=spans, initial=forced_rows, forced=forced, n_forced=counts), None
    checks = dict(zip(config.check_layers, config.ratios))
    return PrefillPlan(
        ids=ids,
        spans=spans,
        forced=forced,
        n_forced=counts,
        checks=checks,
        deviation=config.deviation,
        selection=config.selection,
        budget=Budget.of(config),
    ), None


def prefix_plan(
    ids: torch.Tensor, blocks: list[Block], chunks: ChunkSource, stats: RequestStats, scope: str | None = None
) -> tuple[PrefillPlan, PrefixBlocks | None]:
    """Reuse the longest run of leading blocks whose exact-prefix KV is stored in ``scope``; store the others."""
    t = time.perf_counter()
    keys, parent = [], scope_root(scope)
    for block in blocks[:-1]:  # the last block ends the prompt: never worth storing
        parent = chain_key(chunks.fingerprint, parent, block.token_ids)
        keys.append(parent)
    spans = []
    for key, block in zip(keys, blocks):
        kv = chunks.store.get(key, len(block.token_ids))
        if kv is None:
            stats.cache_misses += 1
            break
        spans.append(CachedSpan(block.start, kv))
        stats.cache_hits += 1
    stats.load_s = time.perf_counter() - t
    reused = spans[-1].end if spans else 0
    stats.cached_tokens = reused
    n = ids.shape[0]
    initial = torch.arange(reused, n, device=ids.device)  # made on the device: no copy
    todo = [(key, b.start, b.end) for key, b in zip(keys[len(spans) :], blocks[len(spans) :])]
    capture = (reused, todo[-1][2]) if todo else None
    plan = PrefillPlan(ids=ids, spans=spans, initial=initial, capture=capture)
    return plan, PrefixBlocks(todo, reused) if todo else None
