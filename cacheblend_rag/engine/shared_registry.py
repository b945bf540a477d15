"""A chunk registry shared through Redis, so every engine of one model finds the chunks any of them registered.

``generate(prompt=...)`` reuses a chunk only if the engine's registry knows the chunk's text. Engines that
share KV through Redis (replicas of ``cacheblend serve``, workers of an app, an ingestion job) share the
registry too with ``share_registry(engine)``: texts registered by one engine are found by the others on
their next request.

Layout: one Redis stream per model at ``<prefix>registry:<model fingerprint>`` beside the KV entries (the
prefix of the engine's Redis tier), one entry per registered text (field ``t``). ``register`` adds the text
locally and appends it to the stream; ``split`` first reads the entries appended since the engine last
looked (one XREAD, usually empty) into the local registry. Only texts travel: each engine builds the handle
from the text with its own tokenizer, so an entry can never make it reuse a wrong KV; at worst the key is
missing from the store and the chunk is computed.

Availability: when Redis cannot be reached, registering and splitting go on with the local registry (the
same backoff as the KV tier, ``health.py``); texts registered meanwhile are appended once Redis answers
again. An engine that cannot read the stream treats the chunks it has not seen as plain text and computes
them: slower, never wrong.

Growth: the stream is capped near the registry's ``max_entries`` (``XADD MAXLEN ~``) and expires with the
tier's ttl once no engine registers or reads (engines that read refresh it at most every ``touch_every``
seconds), as the KV entries do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..store.chunk import ChunkHandle
from ..store.health import Backoff
from .registry import ChunkRegistry

logger = logging.getLogger(__name__)


class SharedChunkRegistry(ChunkRegistry):
    """A ChunkRegistry whose registrations are shared through a Redis (or Redis Cluster) tier's server.

    tier: the engine's RedisTier; make_handle: text -> ChunkHandle (the engine's ``handle``); batch: entries
    read per round trip.
    """

    def __init__(
        self,
        tier,
        fingerprint: str,
        make_handle: Callable[[str], ChunkHandle],
        max_entries: int = 50_000,
        batch: int = 1000,
        touch_every: float = 60.0,
    ) -> None:
        from redis.exceptions import ClusterError, ConnectionError, RedisClusterException, TimeoutError

        super().__init__(max_entries)
        self.tier = tier
        self.key = f"{tier.prefix}registry:{fingerprint}"
        self.batch = batch
        self.touch_every = touch_every
        self._touched = -float("inf")
        self._make_handle = make_handle
        self._down = (ConnectionError, TimeoutError, ClusterError, RedisClusterException)
        base = tier.health
        self.health = Backoff(f"{tier.where} (shared chunk registry)", base.base, base.cap, base.warn_every)
        self._cursor = "0-0"
        self._unpublished: dict[str, None] = {}  # texts registered here that are not in the stream yet
        self._sync_lock = threading.Lock()
        self._counts = {"published": 0, "received": 0, "errors": 0}
        self._warned_response = False

    # ---- the registry's interface -----------------------------------------------------------------
    def register(self, handle: ChunkHandle) -> None:
        """Register ``handle`` here and append its text to the shared stream (if it is new here)."""
        new = bool(handle.text) and self.lookup(handle.text) is None
        super().register(handle)
        if new:
            with self._sync_lock:
                self._unpublished[handle.text] = None
                self._publish()

    def split(self, prompt: str, *args, **kwargs):
        """Like ChunkRegistry.split, after reading the texts other engines registered since the last look."""
        self.sync()
        return super().split(prompt, *args, **kwargs)

    # ---- sharing ----------------------------------------------------------------------------------
    def sync(self) -> int:
        """Publish what is pending and read the texts appended by others; returns how many were read."""
        with self._sync_lock:
            self._publish()
            return self._receive()

    def stats(self) -> dict[str, int]:
        """published / received entries, failed round trips, texts waiting to be published."""
        with self._sync_lock:
            return {**self._counts, "unpublished": len(self._unpublished)}

    def _publish(self) -> None:
        if not self._unpublished or not self.health.allow():
            return
        texts = list(self._unpublished)
        ttl = self.tier.ttl

        def append():
            pipe = self.tier.client.pipeline(transaction=False)
            for text in texts:
                pipe.xadd(self.key, {"t": text.encode()}, maxlen=self.max_entries, approximate=True)
            if ttl:
                pipe.expire(self.key, ttl)
            return pipe.execute()

        if self._round_trip(append) is None:
            return
        for text in texts:
            del self._unpublished[text]
        self._counts["published"] += len(texts)

    def _receive(self) -> int:
        received = 0
        while self.health.allow():
            reply = self._round_trip(lambda: self.tier.client.xread({self.key: self._cursor}, count=self.batch))
            entries = _entries(reply, self.key)
            for entry_id, fields in entries:
                self._cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                text = fields.get(b"t", fields.get("t"))
                if text is None:
                    continue
                text = text.decode() if isinstance(text, bytes) else str(text)
                if self.lookup(text) is None:
                    super().register(self._make_handle(text))
                    received += 1
            if len(entries) < self.batch:
                break
        self._counts["received"] += received
        self._touch()
        return received

    def _touch(self) -> None:
        """Refresh the stream's expiry while engines use it (at most every ``touch_every`` seconds)."""
        now = time.monotonic()
        if not self.tier.ttl or now - self._touched < self.touch_every or not self.health.allow():
            return
        if self._round_trip(lambda: self.tier.client.expire(self.key, self.tier.ttl)) is not None:
            self._touched = now

    def _round_trip(self, fn):
        """Run one Redis call; None if Redis cannot be reached (then back off) or refuses it (logged once)."""
        from redis.exceptions import ResponseError

        try:
            out = fn()
        except self._down as exc:
            self._counts["errors"] += 1
            self.health.failure(exc)
            return None
        except ResponseError as exc:  # e.g. WRONGTYPE: something else is stored under the stream's key
            self._counts["errors"] += 1
            if not self._warned_response:
                self._warned_response = True
                logger.warning(
                    "%s refused the shared chunk registry's call on %s (%s); this engine keeps its own registry",
                    self.tier.where,
                    self.key,
                    exc,
                )
            return None
        self.health.success()
        return out


def _entries(reply, key: str) -> list:
    """[(entry id, fields)] from an XREAD reply (RESP2: [[key, entries]]; RESP3: {key: [entries]})."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()), []) or [])
    for name, entries in reply:
        if (name.decode() if isinstance(name, bytes) else name) == key:
            return list(entries or [])
    return []


def redis_tier_of(engine):
    """The engine's first Redis or Redis Cluster tier, or None."""
    from ..store.redis_tier import RedisTier

    return next((t for t in engine.store.tiers if isinstance(t, RedisTier)), None)


def share_registry(engine, tier=None) -> SharedChunkRegistry | None:
    """Share ``engine``'s chunk registry through its Redis tier (or ``tier``); returns the shared registry,
    or None when the engine has no Redis tier. Call it right after making the engine, before registering
    chunks: it reads what other engines registered so far and replaces ``engine.registry``."""
    if isinstance(engine.registry, SharedChunkRegistry):
        return engine.registry
    tier = tier or redis_tier_of(engine)
    if tier is None:
        logger.info("the engine has no Redis tier: its chunk registry stays its own")
        return None
    if len(engine.registry):
        raise ValueError(
            f"share_registry(engine) must come before chunks are registered (this engine has "
            f"{len(engine.registry)}); call it right after making the engine"
        )
    shared = SharedChunkRegistry(tier, engine.fingerprint, engine.handle, engine.registry.max_entries)
    received = shared.sync()
    logger.info(
        "shared chunk registry at %s on %s: %d chunk texts registered by other engines",
        shared.key,
        tier.where,
        received,
    )
    engine.registry = shared
    return shared
