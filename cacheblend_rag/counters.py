"""Named integer counters that any thread may add to: the engine's metrics and every store tier's stats.

A leaf module (it imports nothing from the package), so the engine and the store can both build on it.
"""

from __future__ import annotations

import threading
from typing import ClassVar


class Counters:
    """Integer counters named by ``FIELDS``, all 0 at first: ``add(hits=1, bytes_read=n)`` from any thread,
    ``snapshot()`` for a consistent copy, ``counters.hits`` to read one."""

    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, **deltas: int) -> None:
        """Add to counters by name; a name not in ``FIELDS`` is an error (nothing is added then)."""
        unknown = sorted(set(deltas) - set(self._counts))
        if unknown:
            name = type(self).__name__
            raise AttributeError(f"{name} has no counter {', '.join(unknown)}; its counters: {', '.join(self.FIELDS)}")
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def snapshot(self) -> dict[str, int]:
        """Every counter, read at one instant."""
        with self._lock:
            return dict(self._counts)

    def __getattr__(self, name: str) -> int:
        counts = self.__dict__.get("_counts")
        if counts is None or name not in counts:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return counts[name]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.snapshot().items())})"
