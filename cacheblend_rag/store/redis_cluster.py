"""Redis Cluster tier: the Redis tier's entries and checks (``redis_tier.py``) spread over a cluster's nodes.

URL: ``redis+cluster://[[user]:password@]host:port[,host:port...][?options]`` (``rediss+cluster://`` for TLS);
the nodes listed are where the client starts, it learns the rest of the cluster from them. The options are
the Redis tier's (ttl, prefix, touch, backoff, backoff_max, warn_every) plus redis-py connection options.

Each entry is one hash, so it lives on the node that owns its key's slot; a request's blocks spread over
the nodes, and one layer of all the blocks on one node is one pipelined round trip.

Availability, per node: a call that cannot reach the node owning a key (connection refused, timeout, the
cluster reporting the slot down) makes the tier skip that node's keys for a while (1s doubling up to 30s),
while the other nodes' keys are still served; their blocks are recomputed meanwhile. Whether the surviving
nodes keep answering when one is lost is the cluster's choice: with ``cluster-require-full-coverage yes``
(Redis' default) the whole cluster refuses commands once it marks a node as failed; a cluster used as a
cache does better with ``cluster-require-full-coverage no`` (or with replicas, which take over the lost
node's slots). The client connects on first use, so an engine starts even while the cluster is down.
"""

from __future__ import annotations

import contextlib
import threading
from urllib.parse import parse_qsl, unquote, urlparse

from .entry import TierUnavailable
from .health import Backoff
from .redact import redact_url
from .redis_tier import OPTIONS, RedisTier, _RedisReader

SCHEMES = ("redis+cluster", "rediss+cluster")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict, dict]:
    """``redis+cluster://...`` -> (startup nodes, our options, redis-py connection options)."""
    parsed = urlparse(url)
    if parsed.scheme not in SCHEMES:
        raise ValueError(
            f"a Redis Cluster URL starts with redis+cluster:// or rediss+cluster://, got {redact_url(url)!r}"
        )
    userinfo, _, hosts = parsed.netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(
                f"bad node {item!r} in Redis Cluster URL {redact_url(url)}; list nodes as host:port,host:port"
            )
        nodes.append((host, int(port)))
    if parsed.path not in ("", "/", "/0"):
        raise ValueError(f"Redis Cluster has only database 0; drop {parsed.path!r} from {redact_url(url)}")
    ours, theirs = {}, {}
    for name, value in parse_qsl(parsed.query, keep_blank_values=True):
        if name in OPTIONS:
            try:
                ours[name] = OPTIONS[name](value)
            except ValueError as exc:
                raise ValueError(f"bad {name}={value!r} in store URL {redact_url(url)}: {exc}") from None
        else:
            theirs[name] = value
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            theirs["username"] = unquote(user)
        if password:
            theirs["password"] = unquote(password)
    if parsed.scheme == "rediss+cluster":
        theirs["ssl"] = True
    return nodes, ours, theirs


class _LazyScript:
    """A Lua script of the tier, registered with the cluster client once the client exists."""

    def __init__(self, client: _LazyClusterClient, source: str) -> None:
        self.client, self.source = client, source
        self._script = None

    def __call__(self, keys=(), args=()):
        if self._script is None:
            self._script = self.client.real().register_script(self.source)
        return self._script(keys=keys, args=args)


class _Pipeline:
    """A cluster pipeline whose ``execute`` raises a reply that says a node or its slots cannot be reached
    (redis-py may return those as replies with ``raise_on_error=False``): the tier then treats the call as
    failed instead of judging the entry."""

    def __init__(self, pipe, down: tuple[type[BaseException], ...]) -> None:
        self._pipe, self._down = pipe, down

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def execute(self, raise_on_error: bool = True) -> list:
        replies = self._pipe.execute(raise_on_error=raise_on_error)
        down = next((r for r in replies if isinstance(r, self._down)), None)
        if down is not None:
            raise down
        return replies


class _LazyClusterClient:
    """Stands in for ``redis.RedisCluster`` until it can be built: redis-py's cluster client connects when it
    is made, and the tier must exist (so the engine starts) while the cluster is down. A method called
    through it builds the client first; if the cluster cannot be reached that raises ConnectionError, which
    the tier handles like any other call that cannot reach Redis."""

    def __init__(self, nodes: list[tuple[str, int]], kwargs: dict) -> None:
        self.nodes, self.kwargs = nodes, kwargs
        self.down_errors: tuple[type[BaseException], ...] = ()
        self._client = None
        self._lock = threading.Lock()

    @property
    def built(self):
        """The cluster client if it has been built, else None."""
        return self._client

    def real(self):
        if self._client is not None:
            return self._client
        from redis.cluster import ClusterNode, RedisCluster
        from redis.exceptions import ConnectionError, RedisClusterException

        with self._lock:
            if self._client is None:
                try:
                    self._client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.nodes], **self.kwargs)
                except RedisClusterException as exc:  # "Redis Cluster cannot be connected"
                    raise ConnectionError(str(exc)) from exc
        return self._client

    def get_connection_kwargs(self) -> dict:
        return dict(self.kwargs)

    def register_script(self, source: str) -> _LazyScript:
        return _LazyScript(self, source)

    def pipeline(self, transaction: bool = False) -> _Pipeline:
        return _Pipeline(self.real().pipeline(transaction=transaction), self.down_errors)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: getattr(self.real(), name)(*args, **kwargs)


class _NodeBatcher:
    """The reads of one cluster node's blocks: the loader groups blocks by batcher, so one layer of all the
    blocks on one node is one round trip, and a dead node fails only its own blocks."""

    def __init__(self, tier: RedisClusterTier, node: str | None) -> None:
        self.tier, self.node = tier, node

    def read_layers(self, items, layer: int) -> list:
        with self.tier.on_node(self.node):
            return self.tier.read_layers(items, layer)


class RedisClusterTier(RedisTier):
    name = "redis-cluster"

    def __init__(
        self, nodes: list[tuple[str, int]], model_fingerprint: str, connection: dict | None = None, **options
    ) -> None:
        """nodes: (host, port) of some cluster nodes; connection: redis-py options (socket_timeout, password,
        ssl, ...); options: the Redis tier's (ttl, prefix, touch, backoff, backoff_max, warn_every, where)."""
        from redis.backoff import NoBackoff
        from redis.exceptions import ClusterError, ConnectionError, RedisClusterException, TimeoutError
        from redis.retry import Retry

        if not nodes:
            raise ValueError("a Redis Cluster tier needs at least one node, e.g. redis+cluster://127.0.0.1:7000")
        kwargs = {
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "require_full_coverage": False,
            "retry": Retry(NoBackoff(), 1),
            **(connection or {}),
        }
        options.setdefault("where", "Redis Cluster at " + ",".join(f"{h}:{p}" for h, p in nodes))
        client = _LazyClusterClient(list(nodes), kwargs)
        super().__init__(client, model_fingerprint, **options)
        # ClusterDownError and TryAgainError are error replies (ResponseError) that mean "unreachable", and
        # RedisClusterException is no RedisError at all
        self._cluster_down = (ClusterError, RedisClusterException)
        self._caught = (self._redis_error, *self._cluster_down)
        client.down_errors = (ConnectionError, TimeoutError, *self._cluster_down)
        self._nodes: dict[str | None, Backoff] = {None: self.health}
        self._batchers: dict[str | None, _NodeBatcher] = {}
        self._nodes_lock = threading.Lock()
        self._local = threading.local()

    @classmethod
    def from_url(cls, url: str, model_fingerprint: str) -> RedisClusterTier:
        """``redis+cluster://[[user]:password@]host:port[,host:port...][?options]``; see the module doc."""
        try:
            from redis.connection import Connection, SSLConnection
        except ImportError:
            raise ImportError(
                "the redis+cluster:// store tier needs redis-py: pip install 'cacheblend-rag[redis]'"
            ) from None
        nodes, ours, theirs = parse_cluster_url(url)
        connection = {name: value if name in _TEXT_OPTIONS else _coerce(value) for name, value in theirs.items()}
        per_connection = {k: v for k, v in connection.items() if k not in _CLUSTER_OPTIONS}
        try:
            (SSLConnection if connection.get("ssl") else Connection)(**per_connection)  # checks; connects later
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"bad Redis Cluster store URL {redact_url(url)}: {exc}; options of ours are "
                f"{', '.join(OPTIONS)}, the rest go to redis-py"
            ) from None
        return cls(nodes, model_fingerprint, connection, **ours)

    # ---- per-node availability ----------------------------------------------------------------------
    def node_of(self, redis_key: str | bytes) -> str | None:
        """The node (host:port) that owns ``redis_key``'s slot, if the client knows the cluster yet."""
        client = self.client.built
        if client is None:
            return None
        try:
            return client.nodes_manager.get_node_from_slot(client.keyslot(redis_key)).name
        except Exception:  # the slot is not covered (its node was lost) or the topology is being refreshed
            return None

    def node_health(self, node: str | None) -> Backoff:
        """The backoff of one node (None: the cluster as a whole, before the client knows its nodes)."""
        with self._nodes_lock:
            health = self._nodes.get(node)
            if health is None:
                base = self.health
                health = self._nodes[node] = Backoff(f"{self.where}, node {node}", base.base, base.cap, base.warn_every)
            return health

    @contextlib.contextmanager
    def on_node(self, node: str | None):
        """Calls made inside (without a key of their own) go to ``node``."""
        previous = getattr(self._local, "node", None)
        self._local.node = node
        try:
            yield
        finally:
            self._local.node = previous

    def _call(self, fn, *args, **kwargs):
        """Run one call, skipped (TierUnavailable) while the node it goes to is backing off."""
        if self.client.built is None:  # connecting: under the cluster-wide backoff
            if not self.health.allow():
                raise TierUnavailable(f"{self.where} is backing off after a failure")
            try:
                self.client.real()
            except self._caught as exc:
                if not self._is_down(exc):
                    raise
                self.stats.add(errors=1)
                self.health.failure(exc)
                raise TierUnavailable(f"{self.where}: {exc}") from exc
            self.health.success()
        keys = kwargs.get("keys")
        if keys:
            node = self.node_of(keys[0])
        elif args and isinstance(args[0], (str, bytes)):
            node = self.node_of(args[0])
        else:
            node = getattr(self._local, "node", None)
        health = self.node_health(node)
        if not health.allow():
            raise TierUnavailable(f"{health.what} is backing off after a failure")
        try:
            out = fn(*args, **kwargs)
        except self._caught as exc:
            if not self._is_down(exc):
                raise
            self.stats.add(errors=1)
            health.failure(exc)
            raise TierUnavailable(f"{health.what}: {exc}") from exc
        health.success()
        return out

    def _is_down(self, exc: BaseException) -> bool:
        return isinstance(exc, self._cluster_down) or super()._is_down(exc)

    def open(self, key: str) -> _RedisReader | None:
        with self.on_node(self.node_of(self.entry_key(key))):
            reader = super().open(key)
        if reader is not None and reader.batcher is not None:
            node = self.node_of(self.entry_key(key))
            with self._nodes_lock:
                reader.batcher = self._batchers.setdefault(node, _NodeBatcher(self, node))
        return reader

    def __repr__(self) -> str:
        return f"RedisClusterTier({self.where}, prefix={self.prefix!r}, ttl={self.ttl})"


# options RedisCluster takes itself; the rest configure each node's connections
_CLUSTER_OPTIONS = {
    "ssl",
    "max_connections",
    "read_from_replicas",
    "require_full_coverage",
    "reinitialize_steps",
    "dynamic_startup_nodes",
    "cluster_error_retry_attempts",
}


_TEXT_OPTIONS = {"username", "password", "client_name", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"}


def _coerce(value: str):
    """A URL option's string as redis-py wants it: numbers as numbers, true/false as booleans."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
