"""Store URLs are shown with their passwords redacted: errors, reprs, logs, metrics."""

from __future__ import annotations

import logging

import pytest

from cacheblend_rag.store import tier_from_url
from cacheblend_rag.store.urls import redact_secrets, redact_url
from tests.conftest import PASSAGES

from .conftest import free_port
from .helpers import FP

SECRET = "S3CRET"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:S3CRET@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://alice:S3CRET@h:1/2?ttl=1h", "rediss://alice:***@h:1/2?ttl=1h"),
        ("redis://:p@S3CRET/x@h/0", "redis://:***@h/0"),  # unescaped "@" and "/" in the password
        ("redis://h/0?password=S3CRET&ttl=bad", "redis://h/0?password=***&ttl=bad"),
        ("rediss://h?ssl_password=S3CRET&socket_timeout=2", "rediss://h?ssl_password=***&socket_timeout=2"),
        ("redis://h/0?prefix=a&auth_token=S3CRET#x", "redis://h/0?prefix=a&auth_token=***#x"),
        ("redis://alice@h/0", "redis://alice@h/0"),
        ("file:///var/cache/kv", "file:///var/cache/kv"),
        ("memory://?max_bytes=2GB", "memory://?max_bytes=2GB"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_secrets_walks_engine_arguments():
    kwargs = {"store": ["memory://", f"redis://:{SECRET}@h/0"], "password": SECRET, "device": "cpu"}
    assert SECRET not in repr(redact_secrets(kwargs))
    assert redact_secrets(kwargs)["device"] == "cpu" and kwargs["store"][1].endswith(f"{SECRET}@h/0")


@pytest.mark.parametrize(
    "url, message",
    [
        (f"redis://127.0.0.1/0?password={SECRET}&ttl=bad", "bad ttl='bad'"),
        (f"redis://:{SECRET}@127.0.0.1/0?ttl=bad", "bad ttl='bad'"),
        (f"redis://:{SECRET}@127.0.0.1/0?socket_timeout=x", "bad Redis store URL"),
        (f"redus://:{SECRET}@127.0.0.1/0", "unknown store URL scheme"),
    ],
)
def test_validation_errors_never_echo_the_password(url, message):
    with pytest.raises(ValueError, match=message) as info:
        tier_from_url(url, FP)
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_repr_logs_and_metrics_never_show_the_password(make_engine, caplog):
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0?password={SECRET}"  # nothing listens there
    engine = make_engine("llama", seed=9, store=["memory://?max_bytes=1GB", url])
    with caplog.at_level(logging.DEBUG):
        handles = engine.precompute(PASSAGES)
        engine.store.tiers[0].clear()
        engine.generate(["Q:\n", *handles], max_new_tokens=2)
    assert "unavailable" in caplog.text
    shown = [caplog.text, repr(engine), repr(engine.store.tiers[1]), str(engine.metrics())]
    assert not [s for s in shown if SECRET in s]


@pytest.mark.parametrize(
    "url, message",
    [
        (f"redis+cluster://h:1?password={SECRET}&ttl=bad", "bad ttl='bad'"),
        (f"redis+cluster://:{SECRET}@h:1,h:x?ttl=1h", "bad node"),
        (f"rediss+cluster://u:{SECRET}@h:1/3", "only database 0"),
        (f"redis+cluster://h:1?token={SECRET}&socket_timeout=x", "bad Redis Cluster store URL"),
    ],
)
def test_cluster_url_errors_never_echo_the_password(url, message):
    """redis_cluster.py redacts query options too (its own redaction once missed them)."""
    with pytest.raises(ValueError, match=message) as info:
        tier_from_url(url, FP)
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_a_cluster_url_given_to_the_wrong_parser_is_redacted_too():
    from cacheblend_rag.store.redis_cluster import parse_cluster_url

    with pytest.raises(ValueError, match="redis\\+cluster://") as info:
        parse_cluster_url(f"redis://:{SECRET}@h:1")
    assert SECRET not in str(info.value)
