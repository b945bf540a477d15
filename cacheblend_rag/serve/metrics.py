"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Server side: ``cacheblend_http_requests_total{endpoint,status}``, ``cacheblend_ttft_seconds{endpoint}`` (from
the request's arrival, queueing included, to its first text piece), ``cacheblend_queue_wait_seconds``,
``cacheblend_queue_depth`` (requests waiting for the engine), ``cacheblend_active_requests``.
Engine side, read from ``engine.metrics()`` at each scrape: ``cacheblend_engine_<counter>_total`` for each
counter (requests, prompt/reused/recomputed/generated tokens, chunk cache hits/misses, ...),
``cacheblend_registered_chunks``, ``cacheblend_store_<counter>_total{tier}`` per store tier (hits, misses,
errors, corrupt, writes, bytes read/written, evictions), and the shared chunk registry's counters.
"""

from __future__ import annotations

from collections.abc import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAUGES = {"registered_chunks"}


class EngineCollector:
    """Exposes the engine's cumulative counters, its store's per-tier counters and the shared registry's."""

    def __init__(self, engine, shared_stats: Callable[[], dict] | None = None) -> None:
        self.engine, self.shared_stats = engine, shared_stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self.engine.metrics()
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if name in GAUGES:
                yield GaugeMetricFamily(f"cacheblend_{name}", f"engine: {name.replace('_', ' ')}", value=value)
            else:
                yield CounterMetricFamily(f"cacheblend_engine_{name}", f"engine: {name.replace('_', ' ')}", value=value)
        tiers = metrics.get("store") or {}
        names = sorted({field for counters in tiers.values() for field in counters})
        for field in names:
            family = CounterMetricFamily(
                f"cacheblend_store_{field}", f"store tier: {field.replace('_', ' ')}", labels=["tier"]
            )
            for tier, counters in tiers.items():
                if field in counters:
                    family.add_metric([tier], counters[field])
            yield family
        if self.shared_stats is not None:
            for name, value in self.shared_stats().items():
                help_text = f"shared chunk registry: {name}"
                if name == "unpublished":
                    yield GaugeMetricFamily("cacheblend_shared_registry_unpublished", help_text, value=value)
                else:
                    yield CounterMetricFamily(f"cacheblend_shared_registry_{name}", help_text, value=value)


class ServerMetrics:
    def __init__(self, engine, scheduler, shared_stats: Callable[[], dict] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cacheblend_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "cacheblend_ttft_seconds",
            "time to first token, queueing included",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "cacheblend_queue_wait_seconds",
            "time a request waited for the engine",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        depth = Gauge("cacheblend_queue_depth", "requests waiting for the engine", registry=self.registry)
        depth.set_function(lambda: scheduler.waiting)
        active = Gauge("cacheblend_active_requests", "requests the engine is decoding", registry=self.registry)
        active.set_function(lambda: scheduler.active)
        self.registry.register(EngineCollector(engine, shared_stats))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
