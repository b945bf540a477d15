"""Per-key quotas on what a caller stores: the distinct chunks (content keys) each caller registered through this
server process, and their tokens. Registering a chunk again costs nothing; the admin is exempt. In memory: a
replica counts what was registered through it, from its start.

A ``prefix_cache`` request stores its prompt's token runs for later requests (``prefix_cache_entries``): each counts
as a chunk, so the strategy is no way around the quota (a 4 KB prompt stored 48 MB of KV in Redis).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.strategies.prefix_cache import prefix_keys
from .access import Caller


@dataclass(frozen=True)
class Stored:
    """One entry a request may store: its content key and tokens (what ``ChunkQuota.charge`` counts)."""

    key: str
    n_tokens: int


def prefix_cache_entries(fingerprint: str, blocks, scope: str | None) -> list[Stored]:
    """The entries a ``prefix_cache`` request of token ``blocks`` (``engine.blocks``) may store in registry
    ``scope``: every block but the last, under the key chain the engine stores it under (``store/keys.py``), so a
    prompt sent again is counted once."""
    keys = prefix_keys(fingerprint, blocks, scope)
    return [Stored(key, len(run.token_ids)) for key, run in zip(keys, blocks)]


class QuotaExceeded(Exception):
    """A registration would take a caller past its quota; the message names the limit and its option."""


class ChunkQuota:
    """max_texts, max_tokens: per caller (0: no limit)."""

    def __init__(self, max_texts: int, max_tokens: int) -> None:
        self.max_texts, self.max_tokens = max_texts, max_tokens
        self._held: dict[str, dict[str, int]] = {}  # caller id -> chunk key -> tokens

    def used(self, caller: Caller) -> tuple[int, int]:
        """(chunks, tokens) ``caller`` registered so far."""
        held = self._held.get(caller.id, {})
        return len(held), sum(held.values())

    def charge(self, caller: Caller, handles) -> list[str]:
        """Count ``handles`` (ChunkHandles, or ``Stored`` entries: anything with ``key`` and ``n_tokens``) against
        ``caller``'s quota; returns the keys newly counted (for ``refund``). Raises QuotaExceeded, counting nothing,
        if they do not fit."""
        if caller.admin:
            return []
        held = self._held.setdefault(caller.id, {})
        new = {h.key: h.n_tokens for h in handles if h.key not in held}
        texts, tokens = len(held) + len(new), sum(held.values()) + sum(new.values())
        if self.max_texts and texts > self.max_texts:
            raise QuotaExceeded(
                f"this key has registered {len(held)} chunks (prompt blocks stored by strategy prefix_cache "
                f"included) and asks for {len(new)} more: over its quota of {self.max_texts} (--chunk-quota-texts); "
                "registering chunks already counted is free"
            )
        if self.max_tokens and tokens > self.max_tokens:
            raise QuotaExceeded(
                f"this key has registered {sum(held.values())} chunk tokens (prompt blocks stored by strategy "
                f"prefix_cache included) and asks for {sum(new.values())} more: over its quota of {self.max_tokens} "
                "tokens (--chunk-quota-tokens)"
            )
        held.update(new)
        return list(new)

    def refund(self, caller: Caller, keys) -> None:
        """Stop counting ``keys`` (from ``charge``) for ``caller``: they were not registered after all."""
        held = self._held.get(caller.id, {})
        for key in keys:
            held.pop(key, None)
