"""The strategies that assemble a request's KV cache, and cacheblend's selection rules, as objects.

``strategy_for(config)`` is the one place a BlendConfig's ``strategy`` and ``selection`` are looked up. A request
then reads: token runs -> ``strategy.plan`` (chunk KV resolved, misses computed, a probe pass if the rule has one)
-> the prefill (``engine/prefill.py``) -> ``strategy.finish``.
"""

from __future__ import annotations

from .base import Selection, Strategy
from .bridge import BridgeSelection
from .cacheblend import CacheBlend
from .deviation import AttentionSelection, DeviationSelection
from .full_recompute import FullRecompute
from .full_reuse import FullReuse
from .prefix_cache import PrefixCache
from .query import QuerySelection
from .reuse import ReusedChunks, reuse_chunks

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FullRecompute, PrefixCache, FullReuse, CacheBlend)}
SELECTIONS: dict[str, type[Selection]] = {
    s.name: s for s in (QuerySelection, BridgeSelection, DeviationSelection, AttentionSelection)
}


# the options that default to None
OPTIONAL = ("check_layers", "check_ratios", "deviation", "fidelity_target", "guard_ratio")


def lookup(table: dict, option: str, name: object) -> type:
    found = table.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"{option} must be one of {', '.join(table)}; got {name!r}")
    return found


def strategy_for(config) -> Strategy:
    """The Strategy (holding its Selection, for cacheblend) that ``config`` asks for: the one place either is chosen.
    Raises ValueError for an unknown name, and for an option given (not None) that the strategy and its selection
    do not read, naming who reads it."""
    cls = lookup(STRATEGIES, "strategy", config.strategy)
    rule = lookup(SELECTIONS, "selection", config.selection)
    strategy = cls(config, rule(config)) if cls.selects else cls(config)
    reads = cls.options | (rule.options if cls.selects else frozenset())
    for option in OPTIONAL:
        value = getattr(config, option)
        if value is not None and option not in reads:
            raise ValueError(
                f"{option}={value!r} does nothing with {strategy.description}: leave it out, or {readers(option)}"
            )
    return strategy


def options_read(strategy: str, selection: str | None = None) -> frozenset[str]:
    """The BlendConfig options a strategy (and, for cacheblend, a selection) reads, besides strategy and backend."""
    cls = lookup(STRATEGIES, "strategy", strategy)
    if not cls.selects or selection is None:
        return cls.options
    return cls.options | lookup(SELECTIONS, "selection", selection).options


def readers(option: str) -> str:
    """Which strategies and selections read ``option``, as the fix for an option given where it is ignored."""
    strategies = [name for name, cls in STRATEGIES.items() if option in cls.options]
    if strategies:
        return "use " + " or ".join(f"strategy={name!r}" for name in strategies)
    selections = [name for name, rule in SELECTIONS.items() if option in rule.options]
    pick = " or ".join(repr(name) for name in selections)
    return f"use strategy='cacheblend' with selection={pick}"


__all__ = [
    "OPTIONAL",
    "SELECTIONS",
    "STRATEGIES",
    "AttentionSelection",
    "BridgeSelection",
    "CacheBlend",
    "DeviationSelection",
    "FullRecompute",
    "FullReuse",
    "PrefixCache",
    "QuerySelection",
    "ReusedChunks",
    "Selection",
    "Strategy",
    "options_read",
    "reuse_chunks",
    "strategy_for",
]
