"""The strategies that assemble a request's KV cache, and cacheblend's selection rules, as objects.

``strategy_for(config)`` is the one place a BlendConfig's ``strategy`` and ``selection`` are looked up. A request
then reads: token runs -> ``strategy.plan`` (chunk KV resolved, misses computed, a probe pass if the rule has one)
-> the prefill (``engine/prefill.py``) -> ``strategy.finish``.
"""

from __future__ import annotations

from .base import Selection, Strategy
from .cacheblend import CacheBlend
from .deviation import AttentionSelection, DeviationSelection
from .full_recompute import FullRecompute
from .full_reuse import FullReuse
from .prefix_cache import PrefixCache
from .query import QuerySelection
from .reuse import ReusedChunks, reuse_chunks

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FullRecompute, PrefixCache, FullReuse, CacheBlend)}
SELECTIONS: dict[str, type[Selection]] = {s.name: s for s in (QuerySelection, DeviationSelection, AttentionSelection)}


def lookup(table: dict, option: str, name: object) -> type:
    found = table.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"{option} must be one of {', '.join(table)}; got {name!r}")
    return found


def strategy_for(config) -> Strategy:
    """The Strategy (holding its Selection, for cacheblend) that ``config`` asks for."""
    cls = lookup(STRATEGIES, "strategy", config.strategy)
    if cls.selects:
        return cls(config, lookup(SELECTIONS, "selection", config.selection)(config))
    return cls(config)


__all__ = [
    "SELECTIONS",
    "STRATEGIES",
    "AttentionSelection",
    "CacheBlend",
    "DeviationSelection",
    "FullRecompute",
    "FullReuse",
    "PrefixCache",
    "QuerySelection",
    "ReusedChunks",
    "Selection",
    "Strategy",
    "reuse_chunks",
    "strategy_for",
]
