"""The ``cacheblend`` command: one module per group of subcommands, all registered on ``app``.

Before anything loads torch, the command sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it: torch's OpenMP
threads then sleep between parallel regions instead of spinning, which on a busy machine (other processes on the
cores) makes decoding, many small steps, several times faster. libgomp reads the variable once, when torch loads.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import bench, bench_store, demo, rag, serve, store  # noqa: F401  (registers the subcommands)
from .common import app, fail


def main() -> None:
    logging.basicConfig(level=os.environ.get("CACHEBLEND_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=True)
    except (ValueError, OSError, ImportError) as exc:  # bad input, files, missing packages: one line, exit 2
        logging.getLogger(__name__).debug("the command failed", exc_info=True)
        raise SystemExit(fail(f"{exc} (CACHEBLEND_LOG=DEBUG shows the traceback)").exit_code) from None


__all__ = ["app", "main"]
