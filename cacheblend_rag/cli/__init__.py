"""The ``cacheblend`` command: one module per group of subcommands, all registered on ``app``."""

from __future__ import annotations

import logging
import os

from . import bench, bench_store, demo, rag, serve, store  # noqa: F401  (registers the subcommands)
from .common import app


def main() -> None:
    logging.basicConfig(level=os.environ.get("CACHEBLEND_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app()


__all__ = ["app", "main"]
