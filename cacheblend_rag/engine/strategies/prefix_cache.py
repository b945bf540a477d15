"""prefix_cache: the longest run of leading token runs whose exact-prefix KV is stored is reused, the rest computed
and stored after the prefill (each run under a key chaining every run before it, salted with the registry scope)."""

from __future__ import annotations

import time

import torch

from ...store import ChunkKV, KVStore, chain_key
from ...store.keys import scope_root
from ..plan import CachedSpan, PlanReport, PrefillPlan
from ..prefill import PrefillResult
from ..transfer import upload
from .base import Strategy


def prefix_keys(fingerprint: str, runs, scope: str | None) -> list[str]:
    """The key of every run but the last (it ends the prompt: never worth storing), each chaining the runs before
    it in registry ``scope`` (``store/keys.py``)."""
    keys, parent = [], scope_root(scope)
    for run in runs[:-1]:
        parent = chain_key(fingerprint, parent, run.token_ids)
        keys.append(parent)
    return keys


class PrefixCache(Strategy):
    name = "prefix_cache"

    def plan(self, runs, chunks, fwd, cache) -> PrefillPlan:
        ids = upload(torch.tensor([t for r in runs for t in r.token_ids], dtype=torch.long), fwd.device)  # [N]
        t = time.perf_counter()
        keys = prefix_keys(chunks.fingerprint, runs, chunks.scope)
        spans, hits, misses = [], 0, 0
        for key, run in zip(keys, runs):
            kv = chunks.store.get(key, len(run.token_ids))
            if kv is None:
                misses += 1
                break
            spans.append(CachedSpan(run.start, kv))
            hits += 1
        report = PlanReport(strategy=self.name, hits=hits, misses=misses, load_s=time.perf_counter() - t)
        reused = spans[-1].end if spans else 0
        n = ids.shape[0]
        initial = torch.arange(reused, n, device=ids.device)  # made on the device: no copy
        todo = tuple((key, r.start, r.end) for key, r in zip(keys[len(spans) :], runs[len(spans) :]))
        capture = (reused, todo[-1][2]) if todo else None
        return PrefillPlan(ids=ids, spans=spans, initial=initial, capture=capture, store_after=todo, report=report)

    def finish(self, plan: PrefillPlan, result: PrefillResult, store: KVStore) -> None:
        """Store each computed run's rows of the captured K/V under its prefix key."""
        if plan.capture is None:
            return
        offset = plan.capture[0]
        for key, start, end in plan.store_after:
            a, b = start - offset, end - offset
            store.put(key, ChunkKV(result.captured.k[:, :, a:b].clone(), result.captured.v[:, :, a:b].clone()))
