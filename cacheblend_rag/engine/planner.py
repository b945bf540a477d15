"""From a request's token blocks and its BlendConfig to a PrefillPlan (which rows are cached, which are
computed, where cacheblend checks), fetching the stored KV it needs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import BlendConfig
from ..store import ChunkKV, chain_key
from .prefill import CachedSpan, PrefillPlan
from .segments import Block
from .selection import Budget
from .stats import RequestStats


@dataclass
class PrefixBlocks:
    """Blocks a prefix_cache request computed and stores for later requests: (key, start, end) each."""

    entries: list[tuple[str, int, int]]
    offset: int  # first captured row


class Planner:
    def __init__(self, engine) -> None:
        self.engine = engine

    def plan(
        self, blocks: list[Block], config: BlendConfig, stats: RequestStats
    ) -> tuple[PrefillPlan, PrefixBlocks | None]:
        engine = self.engine
        ids = engine._ids_tensor([t for b in blocks for t in b.token_ids])
        n = ids.shape[0]
        if config.strategy == "full_recompute":
            return PrefillPlan(ids=ids), None
        if config.strategy == "prefix_cache":
            return self._prefix_plan(ids, blocks, stats)
        t = time.perf_counter()
        spans = []
        cached = [b for b in blocks if b.handle is not None]
        # chunks in a slow tier arrive layer by layer while the prefill runs (store/pipeline.py)
        for block, (kv, hit) in zip(cached, engine.chunk_sources([b.handle for b in cached], stats)):
            spans.append(CachedSpan(block.start, kv))
            stats.cache_hits += hit
            stats.cache_misses += not hit
        stats.load_s = time.perf_counter() - t
        forced = torch.ones(n, dtype=torch.bool, device=ids.device)
        for span in spans:
            forced[span.start + config.recompute_chunk_head : span.end] = False
        forced[n - 1] = True
        stats.cached_tokens = sum(s.kv.n_tokens for s in spans)
        if config.strategy == "full_reuse":
            return PrefillPlan(ids=ids, spans=spans, initial=forced.nonzero().squeeze(1), forced=forced), None
        checks = dict(zip(config.check_layers, config.ratios))
        plan = PrefillPlan(
            ids=ids,
            spans=spans,
            forced=forced,
            checks=checks,
            deviation=config.deviation,
            selection=config.selection,
            budget=Budget.of(config),
        )
        return plan, None

    def _prefix_plan(self, ids: torch.Tensor, blocks: list[Block], stats: RequestStats):
        """Reuse the longest run of leading blocks whose exact-prefix KV is stored; store the others."""
        engine = self.engine
        t = time.perf_counter()
        keys, parent = [], None
        for block in blocks[:-1]:  # the last block ends the prompt: never worth storing
            parent = chain_key(engine.fingerprint, parent, block.token_ids)
            keys.append(parent)
        spans = []
        for key, block in zip(keys, blocks):
            kv = engine.store.get(key, len(block.token_ids))
            if kv is None:
                stats.cache_misses += 1
                break
            spans.append(CachedSpan(block.start, kv))
            stats.cache_hits += 1
        stats.load_s = time.perf_counter() - t
        reused = spans[-1].end if spans else 0
        stats.cached_tokens = reused
        n = ids.shape[0]
        initial = torch.arange(reused, n, device=ids.device)
        todo = [(key, b.start, b.end) for key, b in zip(keys[len(spans) :], blocks[len(spans) :])]
        capture = (reused, todo[-1][2]) if todo else None
        plan = PrefillPlan(ids=ids, spans=spans, initial=initial, capture=capture)
        return plan, PrefixBlocks(todo, reused) if todo else None

    def store_prefix_blocks(self, blocks: PrefixBlocks, captured: ChunkKV) -> None:
        for key, start, end in blocks.entries:
            a, b = start - blocks.offset, end - blocks.offset
            kv = ChunkKV(captured.k[:, :, a:b].clone(), captured.v[:, :, a:b].clone())
            self.engine.store.put(key, kv)
