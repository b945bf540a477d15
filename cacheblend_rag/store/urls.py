"""Build store tiers from URLs: ``memory://?max_bytes=2GB`` (``&pin=1``: pinned host memory; ``&device=cuda``
or ``gpu://``: the device tier), ``file:///var/cache/cb``, ``redis://host:6379/0``."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from .disk import DiskTier
from .memory import MemoryTier
from .redact import redact_secrets, redact_url

__all__ = ["parse_bytes", "redact_secrets", "redact_url", "tier_from_url"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"512MiB"`` -> 536_870_912, ``1024`` -> 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read a byte size from {text!r}; write e.g. 2GB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _flag(text: str, url: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"pin must be 1 or 0 in {redact_url(url)!r}, got {text!r}")


def tier_from_url(url: str, model_fingerprint: str):
    """One tier from its URL."""
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if parsed.scheme in ("memory", "gpu"):
        unknown = set(query) - {"max_bytes", "device", "pin"}
        if unknown:
            raise ValueError(
                f"unknown memory tier option(s) {sorted(unknown)} in {redact_url(url)!r}; use max_bytes, device, pin"
            )
        device = query.get("device", "cuda" if parsed.scheme == "gpu" else None)
        size = query.get("max_bytes")
        max_bytes = parse_bytes(size) if size is not None else None if device not in (None, "cpu") else 2 << 30
        return MemoryTier(max_bytes, device=device, pin=_flag(query.get("pin", "0"), url))
    if parsed.scheme == "file":
        path = unquote(parsed.netloc + parsed.path)
        if not path:
            raise ValueError(f"file store URL needs a path, e.g. file:///var/cache/cb; got {redact_url(url)!r}")
        return DiskTier(Path(path), model_fingerprint)
    if parsed.scheme in ("redis", "rediss"):
        from .redis_tier import RedisTier

        return RedisTier.from_url(url, model_fingerprint)
    if parsed.scheme in ("redis+cluster", "rediss+cluster"):
        from .redis_cluster import RedisClusterTier

        return RedisClusterTier.from_url(url, model_fingerprint)
    raise ValueError(
        f"unknown store URL scheme in {redact_url(url)!r}; use memory://?max_bytes=... (device=cuda, pin=1), "
        "gpu://, file:///path, "
        "redis://host:port/db or redis+cluster://host:port,host:port"
    )
