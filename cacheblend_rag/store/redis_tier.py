"""Redis tier: chunk KV shared by every engine (thread, process, machine) that uses the same Redis.

Layout: one hash per block at ``<prefix><key>``: field ``meta`` holds the entry metadata of ``entry.py`` as
JSON (format and version, key, model fingerprint, shape, dtype, codec, a CRC32 per tensor), and one field
per tensor, ``k.<l>``, ``v.<l>`` (plus ``ks.<l>``, ``vs.<l>`` for int8), holds its raw bytes, so one layer
of one block is one ``HMGET``. A write is one Lua script (atomic in Redis): it creates the whole hash and
its expiry, or, if a valid-looking entry is already there (blocks are content-addressed), only refreshes
its expiry. Readers never see half an entry.

Validation: when an entry is opened, one Lua script judges its sizes inside Redis before anything is sent
(metadata over ``MAX_META_BYTES`` is never fetched; the tensor fields must be the ones the metadata names, of
the total size its shape and codec give), then the metadata is parsed and checked; each tensor's size and CRC
are checked when its layer is read. A value that fails (truncated, oversized, garbage, wrong type, another
model's, another key's) is logged, deleted (only if its metadata is still the one that was read, or is
oversized, so a fresh entry written meanwhile survives) and treated as a miss; the caller recomputes. A field
missing mid-read (the entry expired or was evicted) is a miss.

Expiry: ``ttl`` seconds after the last write or read (reads refresh it unless ``touch=0``); ``ttl=0``
never expires. Under memory pressure Redis' own ``maxmemory-policy`` decides: use ``allkeys-lru`` (or
``volatile-lru`` with a ttl) on a Redis dedicated to the cache; with ``noeviction`` writes fail when it is
full (logged, the request still succeeds).

Availability: a call that fails to connect, times out (``socket_timeout``, default 1s) or gets a reply
that is not Redis' protocol (the URL reaches another service), i.e. any Redis error except an error reply
of the server, makes the tier back off (``health.py``): it is skipped, calls are misses and writes are
dropped, for 1s doubling up to 30s (``backoff``, ``backoff_max``), then tried again; one warning per minute
at most (``warn_every``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import numpy as np
import torch

from .chunk import ChunkKV
from .entry import (
    CorruptEntry,
    EntryMeta,
    LayerReaderBase,
    TierUnavailable,
    encode_entry,
    read_or_miss,
    tensor_bytes,
)
from .health import Backoff
from .redact import redact_url
from .tier import TierStats

logger = logging.getLogger(__name__)

_PUT = """
local ttl = tonumber(ARGV[1])
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'hash' and redis.call('HEXISTS', KEYS[1], 'meta') == 1 then
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  return 0
end
if t ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""

_DELETE_IF = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if t ~= 'hash' or redis.call('HSTRLEN', KEYS[1], 'meta') > tonumber(ARGV[2])
   or (redis.call('HGET', KEYS[1], 'meta') or '') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# What ``open`` needs, judged inside Redis so that nothing of unexpected size is sent: the metadata if it is at
# most ARGV[2] bytes, and the number and total bytes of the other fields (compared with what the metadata
# says); the ttl (ARGV[1]) is refreshed only for an entry that passes. Replies: nil (no entry), {"type", t},
# {"nometa"}, {"meta", bytes} (too large), {"ok", meta, fields, bytes}.
_OPEN = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'hash' then return {'type', t} end
if redis.call('HEXISTS', KEYS[1], 'meta') == 0 then return {'nometa'} end
local size = redis.call('HSTRLEN', KEYS[1], 'meta')
if size > tonumber(ARGV[2]) then return {'meta', size} end
local count, total = 0, 0
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if name ~= 'meta' then
    count = count + 1
    total = total + redis.call('HSTRLEN', KEYS[1], name)
  end
end
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.pcall('EXPIRE', KEYS[1], ttl) end
return {'ok', redis.call('HGET', KEYS[1], 'meta'), count, total}
"""

# The largest entry metadata read (bytes): a real one is ~25 bytes per tensor (a CRC each; 4 tensors per layer
# with int8), under 20 kB for 200 layers; anything larger is not ours, and is neither fetched nor parsed.
MAX_META_BYTES = 256 << 10

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> int:
    """``"7d"`` -> 604800, ``"12h"``, ``"30m"``, ``"45s"``, ``3600``; 0 means never."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.fullmatch(str(text).lower())
        if not match:
            raise ValueError(f"cannot read a duration from {text!r}; write e.g. 3600, 30m, 12h or 7d (0 = never)")
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration must be >= 0, got {text!r}")
    return round(seconds)


def _flag(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


# Options of ours in the URL's query string; every other query option goes to redis-py (socket_timeout,
# socket_connect_timeout, ssl_ca_certs, ssl_cert_reqs, max_connections, health_check_interval, ...).
OPTIONS = {
    "ttl": parse_duration,
    "prefix": str,
    "touch": _flag,
    "backoff": float,
    "backoff_max": float,
    "warn_every": float,
}


class RedisTier:
    name = "redis"

    def __init__(
        self,
        client,
        model_fingerprint: str,
        *,
        prefix: str = "cacheblend:kv:",
        ttl: int = 7 * 86400,
        touch: bool = True,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        warn_every: float = 60.0,
        where: str = "Redis",
    ) -> None:
        """client: a ``redis.Redis`` (bytes replies, i.e. ``decode_responses=False``)."""
        from redis.exceptions import RedisError, ResponseError

        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisTier needs a client with decode_responses=False (values are raw bytes)")
        self.client = client
        self.model_fingerprint = model_fingerprint
        self.prefix = prefix
        self.ttl = parse_duration(ttl)
        self.touch = touch
        self.where = where
        self.stats = TierStats()
        self.health = Backoff(where, backoff, backoff_max, warn_every)
        self._redis_error = RedisError
        self._response_error = ResponseError
        self._put_script = client.register_script(_PUT)
        self._delete_script = client.register_script(_DELETE_IF)
        self._open_script = client.register_script(_OPEN)
        self._last_write_warning = -float("inf")
        self._checked_policy = False

    @classmethod
    def from_url(cls, url: str, model_fingerprint: str) -> RedisTier:
        """``redis://[[user]:password@]host[:port][/db][?options]``, ``rediss://`` for TLS.

        Options: ttl (seconds or 30m/12h/7d, 0 = never; default 7d), prefix (default ``cacheblend:kv:``),
        touch (reads refresh the ttl; default 1), backoff / backoff_max (seconds; default 1 / 30),
        warn_every (seconds between "unavailable" warnings; default 60); anything else is a redis-py
        connection option, e.g. socket_timeout (default 1), socket_connect_timeout (default 1),
        ssl_ca_certs, ssl_cert_reqs, max_connections.
        """
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ImportError("the redis:// store tier needs redis-py: pip install 'cacheblend-rag[redis]'") from None
        parsed = urlparse(url)
        ours, theirs = {}, []
        for name, value in parse_qsl(parsed.query, keep_blank_values=True):
            if name in OPTIONS:
                try:
                    ours[name] = OPTIONS[name](value)
                except ValueError as exc:
                    raise ValueError(f"bad {name}={value!r} in store URL {redact_url(url)}: {exc}") from None
            else:
                theirs.append((name, value))
        redis_url = urlunparse(parsed._replace(query=urlencode(theirs)))
        try:
            client = redis.Redis.from_url(
                redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
            )
            pool = client.connection_pool
            pool.connection_class(**pool.connection_kwargs)  # checks the options; connects only when used
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"bad Redis store URL {redact_url(url)}: {exc}; options of ours are "
                f"{', '.join(OPTIONS)}, the rest go to redis-py"
            ) from None
        host = f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"
        where = f"Redis at {parsed.scheme}://{host}{parsed.path or '/0'}"
        return cls(client, model_fingerprint, where=where, **ours)

    def entry_key(self, key: str) -> str:
        return self.prefix + key

    # ---- calls ------------------------------------------------------------------------------------------
    def _call(self, fn, *args, **kwargs):
        """Run one Redis call; TierUnavailable if the tier is backing off or the call cannot reach Redis."""
        if not self.health.allow():
            raise TierUnavailable(f"{self.where} is backing off after a failure")
        try:
            out = fn(*args, **kwargs)
        except self._redis_error as exc:
            if not self._is_down(exc):
                raise
            self.stats.add(errors=1)
            self.health.failure(exc)
            raise TierUnavailable(f"{self.where}: {exc}") from exc
        self.health.success()
        return out

    def _is_down(self, exc: BaseException) -> bool:
        """Whether a Redis error means the tier cannot be used: cannot connect, timed out, not Redis' protocol
        (InvalidResponse), ...; an error reply (ResponseError) means the server is up."""
        return not isinstance(exc, self._response_error)

    def contains(self, key: str) -> bool:
        try:
            return bool(self._call(self.client.exists, self.entry_key(key)))
        except TierUnavailable:
            return False

    def open(self, key: str) -> _RedisReader | None:
        """A per-layer reader of ``key``'s entry, or None on a miss. Checked before anything large is sent: the
        metadata's size, then its content, then that the tensor fields are the ones it names, of the total
        size its shape and codec give (one round trip; the ttl is refreshed for an entry that passes)."""
        ttl = self.ttl if self.touch else 0
        try:
            reply = self._call(self._open_script, keys=[self.entry_key(key)], args=[ttl, MAX_META_BYTES])
        except TierUnavailable:
            self.stats.add(misses=1)
            return None
        except self._response_error as exc:  # refused (e.g. a script error): a miss, the entry left alone
            self.stats.add(misses=1, errors=1)
            logger.info("%s refused to open entry %s (%s); treating it as a miss", self.where, key[:12], exc)
            return None
        if reply is None:
            self.stats.add(misses=1)
            return None
        raw = None
        try:
            verdict = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if verdict == "type":
                raise CorruptEntry(f"a {reply[1].decode(errors='replace')}, not a hash")
            if verdict == "nometa":
                raise CorruptEntry("the hash has no meta field")
            if verdict == "meta":
                raise CorruptEntry(f"its metadata is {reply[1]} bytes, over {MAX_META_BYTES}")
            raw, count, total = reply[1], int(reply[2]), int(reply[3])
            meta = EntryMeta.parse(json.loads(raw), key, self.model_fingerprint)
            if count != len(meta.names()) or total != meta.stored_bytes:
                raise CorruptEntry(
                    f"it holds {count} tensor fields of {total} bytes in all; its metadata calls for "
                    f"{len(meta.names())} of {meta.stored_bytes}"
                )
        except Exception as exc:
            self._unusable(key, raw if isinstance(raw, bytes) else None, exc)
            return None
        return _RedisReader(self, key, meta, raw, None)

    def get(self, key: str) -> ChunkKV | None:
        """The whole entry (checked like ``open``, then fetched in one round trip), or None on a miss."""
        return read_or_miss(self.open(key))

    def _unusable(self, key: str, raw_meta: bytes | None, exc: BaseException) -> None:
        """Delete a bad entry (unless it changed since ``raw_meta`` was read); log; count a miss."""
        self.stats.add(misses=1)
        try:
            deleted = self._call(
                self._delete_script, keys=[self.entry_key(key)], args=[raw_meta or b"", MAX_META_BYTES]
            )
        except (TierUnavailable, self._response_error):
            deleted = None
        if deleted == 0:  # what was judged is gone already: expired, evicted, replaced or deleted by a peer
            logger.info(
                "%s entry %s changed or expired while being read (%s); treating it as a miss", self.where, key[:12], exc
            )
            return
        self.stats.add(corrupt=1)
        logger.warning("%s entry %s is unusable (%s); treating it as a miss and recomputing", self.where, key[:12], exc)

    def put(self, key: str, kv: ChunkKV) -> None:
        meta, tensors = encode_entry(key, self.model_fingerprint, kv)
        args: list = [self.ttl, "meta", json.dumps(meta.to_strings())]
        for name, t in tensors.items():
            args += [name, tensor_bytes(t).tobytes()]
        try:
            written = self._call(self._put_script, keys=[self.entry_key(key)], args=args)
        except TierUnavailable:
            return
        except self._response_error as exc:  # e.g. OOM with maxmemory-policy noeviction
            self._check_policy()
            now = time.monotonic()
            if now - self._last_write_warning >= self.health.warn_every:
                self._last_write_warning = now
                logger.warning(
                    "%s refused a KV write (%s); continuing without it. If Redis is full, set "
                    "maxmemory-policy allkeys-lru or a ttl",
                    self.where,
                    exc,
                )
            self.stats.add(errors=1)
            return
        if written:
            self.stats.add(writes=1, bytes_written=sum(len(a) for a in args[4::2]))
        self._check_policy()

    def read_layers(self, items: list[tuple[_RedisReader, dict[str, torch.Tensor]]], layer: int) -> list:
        """One layer of several opened entries in one round trip (a pipeline of HMGETs); per item None or the
        exception its read raised (the reader has handled it: logged, counted, deleted if corrupt)."""

        def fetch():
            pipe = self.client.pipeline(transaction=False)
            for reader, out in items:
                pipe.hmget(self.entry_key(reader.key), [f"{short}.{layer}" for short in out])
            return pipe.execute(raise_on_error=False)

        try:
            replies = self._call(fetch)
        except TierUnavailable as exc:
            for reader, _ in items:
                self.stats.add(misses=1)
                reader.close()
            return [exc] * len(items)
        errors: list = []
        for (reader, out), values in zip(items, replies):
            try:
                reader.accept(layer, out, values)
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def delete(self, key: str) -> None:
        with contextlib.suppress(TierUnavailable):
            self._call(self.client.delete, self.entry_key(key))

    def _check_policy(self) -> None:
        """Once: warn if entries can neither expire nor be evicted (CONFIG may be refused: then stay silent)."""
        if self._checked_policy:
            return
        self._checked_policy = True
        try:
            value = next(iter(self.client.config_get("maxmemory-policy").values()), "")
            policy = value.decode() if isinstance(value, bytes) else str(value)  # bytes or str by redis-py version
        except Exception:  # managed Redis often disables CONFIG
            return
        if policy == "noeviction" or (policy.startswith("volatile") and not self.ttl):
            logger.warning(
                "%s has maxmemory-policy %s and the tier's ttl is %s: cached KV may fill it and "
                "writes will then fail. Use maxmemory-policy allkeys-lru on a cache-only Redis, or "
                "set ttl=... in the store URL",
                self.where,
                policy,
                self.ttl or "0 (never)",
            )

    def __repr__(self) -> str:
        return f"RedisTier({self.where}, prefix={self.prefix!r}, ttl={self.ttl})"


class _RedisReader(LayerReaderBase):
    """One opened entry: one HMGET per layer (or the fields a HGETALL already fetched). Its ``batcher`` (the
    tier) lets the loader read one layer of all of a request's blocks in one round trip."""

    def __init__(self, tier: RedisTier, key: str, meta: EntryMeta, raw_meta: bytes, fields: dict | None) -> None:
        self.tier, self.key, self.meta, self.raw_meta, self.fields = tier, key, meta, raw_meta, fields
        self.batcher = tier if fields is None else None

    def prefetch(self) -> None:
        """Fetch every tensor field in one round trip (for a whole-entry read; ``open`` checked their sizes). A
        failure here leaves the reader as it was: the layers are then read one by one, and fail there."""
        names = self.meta.names()
        try:
            values = self.tier._call(self.tier.client.hmget, self.tier.entry_key(self.key), names)
        except Exception:
            return
        self.fields = {name.encode(): value for name, value in zip(names, values)}
        self.batcher = None

    def read_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None:
        # out: short name -> contiguous tensor of the spec's shape and dtype, filled in place
        names = [f"{short}.{layer}" for short in out]
        if self.fields is not None:
            values = [self.fields.get(name.encode()) for name in names]
        else:
            try:
                values = self.tier._call(self.tier.client.hmget, self.tier.entry_key(self.key), names)
            except TierUnavailable:
                self.tier.stats.add(misses=1)
                self.close()
                raise
            except Exception as exc:  # e.g. WRONGTYPE: replaced by something else meanwhile
                values = exc
        self.accept(layer, out, values)

    def accept(self, layer: int, out: dict[str, torch.Tensor], values) -> None:
        """Check ``layer``'s fetched field values (or the error fetching them) and copy them into ``out``."""
        self._checked_fill(layer, out, values)

    def _fill(self, layer: int, out: dict[str, torch.Tensor], values=None) -> None:
        if isinstance(values, Exception):
            raise values
        for t, short, raw in zip(out.values(), out, values):
            name = f"{short}.{layer}"
            if raw is None:
                raise CorruptEntry(f"field {name} is missing")
            view = tensor_bytes(t)
            if len(raw) != view.nbytes:
                raise CorruptEntry(f"field {name} has {len(raw)} bytes, expected {view.nbytes}")
            view[:] = np.frombuffer(raw, dtype=np.uint8)
            self.meta.check(name, t)

    def _discard(self, exc: BaseException) -> None:
        self.tier._unusable(self.key, self.raw_meta, exc)

    def _release(self) -> None:
        self.fields = None
