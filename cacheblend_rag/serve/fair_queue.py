"""The scheduler's waiting line: first in, first out per caller, the callers served in turn (round robin).

A caller that sends many requests at once queues them behind its own, not in front of everyone else's: the next
request admitted is the oldest of the caller whose turn it is, and that caller then goes to the back of the line.
Callers are named by the server (``Caller.id``: a key's digest, ``admin``, or ``anonymous`` for every client of a
server without keys, which then share one FIFO).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items queued per caller; ``peek``/``pop`` give the head of the caller whose turn it is."""

    def __init__(self) -> None:
        self._lines: OrderedDict[Hashable, deque[T]] = OrderedDict()  # callers in turn order
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, item: T, caller: Hashable = None) -> None:
        self._lines.setdefault(caller, deque()).append(item)
        self._count += 1

    def peek(self) -> T | None:
        """The item ``pop`` would return (None when empty)."""
        for line in self._lines.values():
            return line[0]
        return None

    def pop(self) -> T:
        """The oldest item of the caller whose turn it is; that caller goes to the back of the line."""
        if not self._count:
            raise IndexError("pop from an empty FairQueue")
        caller, line = next(iter(self._lines.items()))
        item = line.popleft()
        self._count -= 1
        if line:
            self._lines.move_to_end(caller)
        else:
            del self._lines[caller]
        return item

    def remove(self, item: T) -> bool:
        """Take ``item`` out of the queue; False if it was not in it."""
        for caller, line in self._lines.items():
            if item in line:
                line.remove(item)
                self._count -= 1
                if not line:
                    del self._lines[caller]
                return True
        return False

    def clear(self) -> list[T]:
        """Empty the queue; returns what it held, in turn order."""
        items = []
        while self._count:
            items.append(self.pop())
        return items
