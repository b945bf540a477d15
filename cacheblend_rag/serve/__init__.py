"""``cacheblend serve``: an OpenAI-compatible HTTP server over one CacheBlendEngine (needs the ``serve`` extra).

Replicas of the server share chunks through Redis: the KV in the store's Redis (or Redis Cluster) tier, the
chunk texts in the shared registry (``cacheblend_rag.engine.shared_registry``). See docs/SERVE.md.
"""

from __future__ import annotations

import importlib

EXTRA_HINT = "pip install 'cacheblend-rag[serve]'"
_NEEDS = {"fastapi": "FastAPI", "uvicorn": "uvicorn", "pydantic": "pydantic", "prometheus_client": "prometheus-client"}


def require_serve() -> None:
    """Raise ImportError naming the ``serve`` extra if a package the server needs is missing."""
    missing = []
    for module, name in _NEEDS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"the cacheblend server needs {', '.join(missing)}: {EXTRA_HINT}")


def create_app(engine, **options):
    """The FastAPI app serving ``engine`` (see ``cacheblend_rag.serve.app.create_app``)."""
    require_serve()
    from .app import create_app as _create_app

    return _create_app(engine, **options)


def serve(
    engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    header_timeout: float = 10.0,
    keep_alive_timeout: int = 5,
    max_connections: int = 256,
    **options,
) -> None:
    """Run the server in this process until it is stopped (Ctrl-C / SIGTERM). ``options``: those of
    ``create_app``; the connection limits: ``cacheblend_rag.serve.protocol.ServerLimits``."""
    require_serve()
    from .protocol import ServerLimits
    from .server import build_server

    limits = ServerLimits(header_timeout, keep_alive_timeout, max_connections)
    build_server(create_app(engine, **options), host, port, limits=limits, log_level=log_level).run()


__all__ = ["create_app", "require_serve", "serve"]
