"""A chunk registry shared through Redis, so every engine of one model finds the chunks any of them registered.

``generate(prompt=...)`` reuses a chunk only if the engine's registry knows the chunk's text. Engines that
share KV through Redis (replicas of ``cacheblend serve``, workers of an app, an ingestion job) share the
registry too with ``share_registry(engine)``: texts registered by one engine are found by the others on
their next request.

Layout: one Redis stream per model at ``<prefix>registry:<model fingerprint>`` beside the KV entries (the
prefix of the engine's Redis tier), one entry per registered text (field ``t``). ``register`` adds the text
locally and appends it to the stream; ``split`` first reads the entries appended since the engine last
looked (one round trip, usually empty) into the local registry. Only texts (and, for a chunk precomputed after
a context, the context's token ids, field ``c``: unsigned 32-bit little-endian) travel: each engine builds the
handle from them with its own tokenizer, so an entry can never make it reuse a wrong KV (the context is part of
the key); at worst the key is missing from the store and the chunk is computed, after its context. A registry of
one *scope* (``scope="..."``) uses its own stream, ``<prefix>registry:<model fingerprint>:<scope>``, and sees no
other scope's texts.

Untrusted input: whoever can write the Redis database can append anything to the stream, so every entry is
checked before it is used, and a bad one is skipped and counted (``stats()["rejected"]``), never failing a
start or a request: an entry without a ``t`` field, a context field that is over the byte bound, not whole
32-bit ids or holds an id outside the vocabulary, a text that is not UTF-8, empty, longer than
``max_text_bytes`` (by default ``BYTES_PER_TOKEN`` bytes per token of the context window: such a text could
never fit in a prompt), longer than the context window once tokenized (with its context), or too short to
register. Sizes are
checked inside Redis (a Lua script reads the stream): a text over the byte bound is never sent, decoded or
tokenized, and one read sends at most about ``read_bytes`` of texts.

Availability: when Redis cannot be reached, or refuses the registry's calls (e.g. WRONGTYPE: something else is
stored under the stream's key), ``available`` is False and registering and splitting go on with the local
registry (the same backoff as the KV tier, ``health.py``); texts registered meanwhile are appended once Redis
answers again. An engine that cannot read the stream treats the chunks it has not seen as plain text and
computes them: slower, never wrong.

Lost data: when Redis loses the stream (FLUSHALL, a restart without persistence, expiry), an engine that finds
it gone or empty, on a read or when its own append recreates it, republishes the texts it holds (at most
``max_entries``, once per loss: the stream is not empty afterwards, so no other engine republishes them
again). Their KV is gone too and is computed on first use.

Growth and eviction: the stream is capped near the registry's ``max_entries`` (``XADD MAXLEN ~``) and expires
with the tier's ttl once no engine registers or reads (engines that read refresh it at most every
``touch_every`` seconds), as the KV entries do. Each engine's registry evicts its least recently used text
(``registry.py``); so that a flood of registrations does not push texts still in use out of the stream (and
out of the engines that start later), a text that a prompt matches is appended again once
``max_entries // 2`` entries have been appended after its last appearance.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from collections.abc import Callable
from functools import partial

from ..store.chunk import ChunkHandle
from ..store.health import Backoff
from ..store.keys import scope_salt
from .registry import MIN_TOKENS, ChunkRegistry

logger = logging.getLogger(__name__)

BYTES_PER_TOKEN = 16  # the byte bound on a text read from the stream, per token of the context window
MAX_TEXT_BYTES = 1 << 20  # the byte bound when no context window is given
SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Read up to ARGV[2] entries after ARGV[1] (inclusive), sending each entry's text (its first field "t") and context
# (its first field "c") only if each is at most ARGV[3] bytes (else its length, an integer; no such field: nil),
# and stopping once ARGV[4] bytes are collected. Reply: {stream length, last entry id or "", more (1: read again),
# id, text, context, id, text, context, ...}.
_READ = """
local length = redis.call('XLEN', KEYS[1])
if length == 0 then return {0, '', 0} end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1][1]
local count, limit, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', count)
local out, used, more = {length, last, 0}, 0, 0
if #entries == count then more = 1 end
for i, entry in ipairs(entries) do
  local text, context, fields = false, false, entry[2]
  for j = 1, #fields - 1, 2 do
    if fields[j] == 't' and not text then text = fields[j + 1] end
    if fields[j] == 'c' and not context then context = fields[j + 1] end
  end
  if text and #text > limit then text = #text end
  if context and #context > limit then context = #context end
  if type(text) == 'string' then used = used + #text end
  if type(context) == 'string' then used = used + #context end
  out[#out + 1] = entry[1]
  out[#out + 1] = text
  out[#out + 1] = context
  if used >= budget and i < #entries then
    more = 1
    break
  end
end
return out
"""


class SharedChunkRegistry(ChunkRegistry):
    """A ChunkRegistry whose registrations are shared through a Redis (or Redis Cluster) tier's server.

    tier: the engine's RedisTier; make_handle: text -> ChunkHandle (the engine's ``handle``); batch: entries
    read or appended per round trip; min_tokens, whitespace: as ChunkRegistry's; context_window: the engine's (texts of
    more tokens are neither registered from the stream nor appended to it); max_text_bytes: the longest text
    read (default ``BYTES_PER_TOKEN`` x context_window); read_bytes: about the most text one read sends;
    scope: None for the model's stream, else a name (letters, digits, ``_.-``) whose stream no other scope sees;
    vocab_size: the model's (context token ids at or above it are refused). make_handle also takes
    ``context_ids=`` for entries of chunks computed after a context.
    """

    def __init__(
        self,
        tier,
        fingerprint: str,
        make_handle: Callable[[str], ChunkHandle],
        max_entries: int = 50_000,
        batch: int = 1000,
        touch_every: float = 60.0,
        *,
        min_tokens: int = MIN_TOKENS,
        whitespace: Callable[[int], bool] | None = None,
        context_window: int | None = None,
        max_text_bytes: int | None = None,
        read_bytes: int = 8 << 20,
        scope: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        from redis.exceptions import ClusterError, ConnectionError, RedisClusterException, TimeoutError

        super().__init__(max_entries, min_tokens, whitespace=whitespace)
        if scope is not None and not (isinstance(scope, str) and SCOPE.fullmatch(scope)):
            raise ValueError(f"a registry scope is 1-64 letters, digits, '_', '.' or '-'; got {scope!r}")
        self.tier = tier
        self.scope = scope
        self.key = f"{tier.prefix}registry:{fingerprint}" + (f":{scope}" if scope is not None else "")
        self.batch = batch
        self.touch_every = touch_every
        self.context_window = context_window
        self.vocab_size = vocab_size
        if max_text_bytes is None:
            max_text_bytes = BYTES_PER_TOKEN * context_window if context_window else MAX_TEXT_BYTES
        self.max_text_bytes = max_text_bytes
        self.read_bytes = read_bytes
        self._touched = -float("inf")
        self._make_handle = make_handle
        self._down = (ConnectionError, TimeoutError, ClusterError, RedisClusterException)
        base = tier.health
        self.health = Backoff(f"{tier.where} (shared chunk registry)", base.base, base.cap, base.warn_every)
        self._read_script = tier.client.register_script(_READ)
        self._cursor = (0, 0)  # the id of the last stream entry read
        self._unpublished: dict[str, None] = {}  # texts registered here that are not in the stream yet
        self._seq = 0  # stream entries read so far
        self._seen: dict[str, int] = {}  # text -> self._seq when it last appeared in the stream
        self._sync_lock = threading.Lock()
        self._counts = {"published": 0, "received": 0, "errors": 0, "rejected": 0, "republished": 0, "refreshed": 0}
        self._warned_response = False
        self._rejected_since_warning = 0
        self._last_reject_warning = -float("inf")

    @property
    def available(self) -> bool:
        """False while the registry's last call to Redis failed or was refused (it is backing off)."""
        return not self.health.down

    # ---- the registry's interface -----------------------------------------------------------------
    def register(self, handle: ChunkHandle) -> bool:
        """Register ``handle`` here and append its text to the shared stream (if it is new here)."""
        with self._lock:
            old = self._by_text.get(handle.text)
        new = old is None or old.context_ids != handle.context_ids  # a text registered again with another context
        registered = super().register(handle)
        if registered and new and self._shareable(handle):
            with self._sync_lock:
                self._unpublished[handle.text] = None
                self._publish()
        return registered

    def split(self, token_ids, *args, **kwargs):
        """Like ChunkRegistry.split, after reading the texts other engines registered since the last look. A
        chunk found whose last appearance in the stream is ``max_entries // 2`` entries old is appended again
        (at the next sync), so that texts in use stay in the stream through a flood of registrations."""
        self.sync()
        out = super().split(token_ids, *args, **kwargs)
        stale = self.max_entries // 2
        with self._sync_lock:
            for part in out:
                if isinstance(part, ChunkHandle) and self._seq - self._seen.get(part.text, self._seq) > stale:
                    self._seen[part.text] = self._seq
                    self._unpublished[part.text] = None
                    self._counts["refreshed"] += 1
        return out

    # ---- sharing ----------------------------------------------------------------------------------
    def sync(self) -> int:
        """Publish what is pending and read the texts appended by others; returns how many were registered."""
        with self._sync_lock:
            self._publish()
            received = self._receive()
            if self._unpublished:  # found the stream lost while reading: republish now
                self._publish()
            return received

    def stats(self) -> dict[str, int]:
        """Counters: texts published, received (registered from the stream), rejected (bad entries skipped),
        republished (after Redis lost the stream), refreshed (appended again while in use), failed round trips
        (errors); and the texts waiting to be published (unpublished)."""
        with self._sync_lock:
            return {**self._counts, "unpublished": len(self._unpublished)}

    def _shareable(self, handle: ChunkHandle) -> bool:
        """Whether other engines would accept ``handle``'s text from the stream."""
        too_long = self.context_window is not None and handle.n_tokens > self.context_window
        return not too_long and len(handle.text.encode()) <= self.max_text_bytes

    def _publish(self) -> None:
        while self._unpublished and self.health.allow():
            texts = list(self._unpublished)[: self.batch]
            replies = self._round_trip(partial(self._append, texts))
            if replies is None:
                return
            for text in texts:
                del self._unpublished[text]
            self._counts["published"] += len(texts)
            if not replies[0]:  # the stream was gone: Redis lost it (or it expired); our append recreated it
                self._lost(published=texts)

    def _append(self, texts: list[str]) -> list:
        """One round trip: whether the stream exists, then ``texts`` appended (and the stream's expiry set)."""
        pipe = self.tier.client.pipeline(transaction=False)
        pipe.exists(self.key)
        for text in texts:
            with self._lock:
                handle = self._by_text.get(text)
            fields = {"t": text.encode()}
            if handle is not None and handle.context_ids:
                fields["c"] = encode_context(handle.context_ids)
            pipe.xadd(self.key, fields, maxlen=self.max_entries, approximate=True)
        if self.tier.ttl:
            pipe.expire(self.key, self.tier.ttl)
        return pipe.execute()

    def _receive(self) -> int:
        received = 0
        budget = 2 * self.max_entries + self.batch  # the stream holds about max_entries: a sync ends
        while budget > 0 and self.health.allow():
            start = _after(self._cursor)
            if start is None:  # the cursor is the largest id a stream can hold: nothing can follow it
                break
            args = [start, min(self.batch, budget), self.max_text_bytes, self.read_bytes]
            reply = self._round_trip(partial(self._read_script, keys=[self.key], args=args))
            if reply is None:
                break
            try:
                length, last, more = int(reply[0]), _entry_id(reply[1]) if reply[1] else None, bool(reply[2])
                items = [(_entry_id(reply[i]), reply[i + 1], reply[i + 2]) for i in range(3, len(reply) - 2, 3)]
            except (TypeError, ValueError, IndexError) as exc:  # not the script's reply: stop reading
                self._reject(f"an unreadable reply ({exc})")
                break
            if length == 0 or (last is not None and last < self._cursor):  # gone, emptied or recreated
                self._lost()
                if length == 0:
                    break
                continue
            for entry_id, raw, context in items:
                self._cursor = max(self._cursor, entry_id)
                self._seq += 1
                received += self._accept(entry_id, raw, context)
            budget -= len(items)
            if not more or not items:
                break
        self._counts["received"] += received
        if len(self._seen) > 2 * self.max_entries:
            self._seen = {t: s for t, s in self._seen.items() if t in self}
        self._touch()
        return received

    def _accept(self, entry_id: tuple[int, int], raw, raw_context=None) -> int:
        """Register one entry's text (computed after its context, if any) (1), or skip a known text (0) or a bad
        entry (0, counted and logged)."""
        where = f"entry {entry_id[0]}-{entry_id[1]}"
        if raw is None:
            return self._reject(f"{where} has no text field 't'")
        if isinstance(raw, int) or (isinstance(raw, bytes) and len(raw) > self.max_text_bytes):
            size = raw if isinstance(raw, int) else len(raw)
            return self._reject(f"{where} holds {size} bytes, over the bound of {self.max_text_bytes}")
        if not isinstance(raw, bytes):
            return self._reject(f"{where} came back as {type(raw).__name__}, not bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._reject(f"{where} is not UTF-8 ({exc})")
        if not text:
            return self._reject(f"{where} holds an empty text")
        try:
            context_ids = decode_context(raw_context, self.max_text_bytes, self.vocab_size)
        except ValueError as exc:
            return self._reject(f"{where} has a bad context field 'c' ({exc})")
        self._seen[text] = self._seq
        known = self.lookup(text)
        if known is not None and known.context_ids == context_ids:  # known here: a use, so it is evicted later
            return 0
        try:
            handle = self._make_handle(text, context_ids=context_ids) if context_ids else self._make_handle(text)
        except Exception as exc:
            return self._reject(f"{where} cannot be tokenized ({type(exc).__name__}: {exc})")
        if self.context_window is not None and handle.n_tokens + len(context_ids) > self.context_window:
            return self._reject(
                f"{where} is {handle.n_tokens} tokens after {len(context_ids)} of context, over the context window"
            )
        if not super().register(handle):
            return self._reject(f"{where} is {handle.n_tokens} tokens, under min_tokens={self.min_tokens}")
        return 1

    def _reject(self, why: str) -> int:
        self._counts["rejected"] += 1
        self._rejected_since_warning += 1
        now = time.monotonic()
        if now - self._last_reject_warning >= self.health.warn_every:
            logger.warning(
                "shared chunk registry %s on %s: skipped a bad entry (%s) [%d skipped since the last warning; "
                "this warning repeats at most every %gs]",
                self.key,
                self.tier.where,
                why,
                self._rejected_since_warning,
                self.health.warn_every,
            )
            self._last_reject_warning = now
            self._rejected_since_warning = 0
        return 0

    def _lost(self, published: list[str] = ()) -> None:
        """The stream is gone, empty, or not the one read so far: read it from its start again, and republish
        the texts held here that it may have lost (not those just ``published``)."""
        self._cursor = (0, 0)
        just = set(published)
        with self._lock:
            held = [h for h in self._by_text.values() if h.text not in just and h.text not in self._unpublished]
        held = [h for h in held if self._shareable(h)]
        for handle in held:  # least recently used first: readers' registries keep the same order
            self._unpublished[handle.text] = None
        self._counts["republished"] += len(held)
        if held:
            logger.warning(
                "shared chunk registry %s on %s was lost (Redis flushed, restarted without persistence, or "
                "expired): republishing the %d chunk texts this engine holds; their KV is computed on first use",
                self.key,
                self.tier.where,
                len(held),
            )

    def _touch(self) -> None:
        """Refresh the stream's expiry while engines use it (at most every ``touch_every`` seconds)."""
        now = time.monotonic()
        if not self.tier.ttl or now - self._touched < self.touch_every or not self.health.allow():
            return
        if self._round_trip(lambda: self.tier.client.expire(self.key, self.tier.ttl)) is not None:
            self._touched = now

    def _round_trip(self, fn):
        """Run one Redis call; None if Redis cannot be reached or refuses it (then back off: not available)."""
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
                    "%s refused the shared chunk registry's call on %s (%s); this engine keeps its own registry "
                    "until it succeeds (delete or rename what is stored under that key)",
                    self.tier.where,
                    self.key,
                    exc,
                )
            self.health.failure(exc)
            return None
        self.health.success()
        return out


def encode_context(context_ids) -> bytes:
    """A context's token ids as a stream field: unsigned 32-bit little-endian integers."""
    return struct.pack(f"<{len(context_ids)}I", *context_ids)


def decode_context(raw, max_bytes: int, vocab_size: int | None) -> tuple[int, ...]:
    """The token ids of a stream entry's context field (None: no context); ValueError when it is not one."""
    if raw is None:
        return ()
    if isinstance(raw, int) or (isinstance(raw, bytes) and len(raw) > max_bytes):
        raise ValueError(f"{raw if isinstance(raw, int) else len(raw)} bytes, over the bound of {max_bytes}")
    if not isinstance(raw, bytes) or not raw or len(raw) % 4:
        raise ValueError("not a non-empty run of 32-bit token ids")
    ids = struct.unpack(f"<{len(raw) // 4}I", raw)
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(f"token id {max(ids)} is not in the vocabulary of {vocab_size}")
    return ids


def _entry_id(raw) -> tuple[int, int]:
    """A stream entry id (``b"1700000000000-3"``) as (milliseconds, sequence)."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
    ms, sep, seq = text.partition("-")
    if not sep:
        raise ValueError(f"not a stream entry id: {text[:40]!r}")
    return int(ms), int(seq)


_MAX_ID_PART = 2**64 - 1


def _after(entry_id: tuple[int, int]) -> str | None:
    """The smallest stream id after ``entry_id`` (XRANGE's start is inclusive), or None if there is none."""
    ms, seq = entry_id
    if seq < _MAX_ID_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < _MAX_ID_PART else None


def redis_tier_of(engine):
    """The engine's first Redis or Redis Cluster tier, or None."""
    from ..store.redis_tier import RedisTier

    return next((t for t in engine.store.tiers if isinstance(t, RedisTier)), None)


def shared_registry_for(engine, tier=None, scope: str | None = None) -> SharedChunkRegistry | None:
    """A shared registry of the engine's registry scope ``scope`` (None: the default scope) through its Redis tier
    (or ``tier``), filled with the texts already in its stream; None when the engine has no Redis tier. Its handles
    are the scope's (salted keys) and its stream is named by the scope's salt, never by the scope's name. It does not
    become ``engine.registry`` (``share_registry`` does that)."""
    tier = tier or redis_tier_of(engine)
    if tier is None:
        return None
    options = engine.registry_options()
    shared = SharedChunkRegistry(
        tier,
        engine.fingerprint,
        partial(engine.handle, scope=scope),
        options["max_entries"],
        min_tokens=options["min_tokens"],
        whitespace=options["whitespace"],
        context_window=engine.context_window,
        scope=scope_salt(scope),
        vocab_size=getattr(getattr(engine.model, "config", None), "vocab_size", None),
    )
    shared.sync()
    return shared


def share_registry(engine, tier=None) -> SharedChunkRegistry | None:
    """Share ``engine``'s chunk registries through its Redis tier (or ``tier``): the default scope's now (returned;
    None when the engine has no Redis tier), every other scope's when it is first named. Call it right after making
    the engine, before registering chunks: it reads what other engines registered so far and replaces
    ``engine.registry``."""
    if isinstance(engine.registry, SharedChunkRegistry):
        return engine.registry
    if tier is None and redis_tier_of(engine) is None:
        logger.info("the engine has no Redis tier: its chunk registry stays its own")
        return None
    if len(engine.registry):
        raise ValueError(
            f"share_registry(engine) must come before chunks are registered (this engine has "
            f"{len(engine.registry)}); call it right after making the engine"
        )
    shared = shared_registry_for(engine, tier)
    logger.info(
        "shared chunk registry at %s on %s: %d chunk texts registered by other engines (%d bad entries skipped)",
        shared.key,
        shared.tier.where,
        len(shared),
        shared.stats()["rejected"],
    )
    engine.registry = shared

    def scoped(scope: str | None) -> ChunkRegistry:  # every other scope's registry is shared too
        registry = shared_registry_for(engine, tier, scope)  # an empty registry is falsy: compare with None
        return registry if registry is not None else engine.new_registry(scope)

    engine.registry_factory = scoped
    return shared
