"""Backoff for a remote tier: after a failed call, skip the tier for a while instead of failing every request.

After a failure the tier is skipped for ``base`` seconds, doubling with each consecutive failure up to
``cap``; the first call after the delay tries again, and a success resets everything. The warning that the
tier is down is logged at most once per ``warn_every`` seconds (with the count of calls skipped meanwhile),
so a dead server does not flood the log with one line per request.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)


class Backoff:
    def __init__(self, what: str, base: float = 1.0, cap: float = 30.0, warn_every: float = 60.0) -> None:
        if not 0 <= base <= cap:
            raise ValueError(f"backoff needs 0 <= base <= cap, got base={base}, cap={cap}")
        self.what = what
        self.base, self.cap, self.warn_every = base, cap, warn_every
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0
        self._down_since = 0.0
        self._last_warning = -float("inf")
        self._skipped = 0

    @property
    def down(self) -> bool:
        return self._failures > 0

    def allow(self) -> bool:
        """Whether to try the tier now (False while backing off after a failure)."""
        with self._lock:
            if time.monotonic() >= self._until:
                return True
            self._skipped += 1
            return False

    def failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if self._failures == 0:
                self._down_since = now
            self._failures += 1
            delay = min(self.cap, self.base * 2 ** min(self._failures - 1, 30))
            self._until = now + delay
            if now - self._last_warning < self.warn_every:
                return
            self._last_warning = now
            skipped, self._skipped = self._skipped, 0
        logger.warning(
            "%s is unavailable (%s: %s); serving without it (its chunks are recomputed) and retrying in %.1fs "
            "[%d failed attempts, %d calls skipped since the last warning; this warning repeats at most every %gs]",
            self.what,
            type(exc).__name__,
            exc,
            delay,
            self._failures,
            skipped,
            self.warn_every,
        )

    def success(self) -> None:
        if self._failures == 0:  # the common case: no lock
            return
        with self._lock:
            failures, since = self._failures, self._down_since
            self._failures = 0
            self._until = 0.0
            self._skipped = 0
            self._last_warning = -float("inf")
        if failures:
            logger.warning(
                "%s is available again after %.1fs (%d failed attempts)", self.what, time.monotonic() - since, failures
            )
