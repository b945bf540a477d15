"""Text -> handle registry, and splitting a finished prompt back into text and cached chunks.

Frameworks hand the LLM one string. Every chunk text registered here is found again inside that string
(any order, any surrounding template): each position of the prompt is looked up by its first
``ANCHOR`` characters, and a candidate matches only if its whole text is there. Text that matches no
registered chunk stays text and is computed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..store.chunk import ChunkHandle

ANCHOR = 24


class ChunkRegistry:
    """LRU-bounded map of chunk texts to handles."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._by_text: OrderedDict[str, ChunkHandle] = OrderedDict()
        self._by_anchor: dict[str, set[str]] = {}
        self._short: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_text)

    def register(self, handle: ChunkHandle) -> None:
        text = handle.text
        if not text:
            return
        with self._lock:
            if text in self._by_text:
                self._by_text.move_to_end(text)
                self._by_text[text] = handle
                return
            self._by_text[text] = handle
            if len(text) < ANCHOR:
                self._short.add(text)
            else:
                self._by_anchor.setdefault(text[:ANCHOR], set()).add(text)
            while len(self._by_text) > self.max_entries:
                old, _ = self._by_text.popitem(last=False)
                self._forget(old)

    def _forget(self, text: str) -> None:
        if len(text) < ANCHOR:
            self._short.discard(text)
            return
        bucket = self._by_anchor.get(text[:ANCHOR])
        if bucket is not None:
            bucket.discard(text)
            if not bucket:
                del self._by_anchor[text[:ANCHOR]]

    def lookup(self, text: str) -> ChunkHandle | None:
        with self._lock:
            return self._by_text.get(text)

    def split(self, prompt: str) -> list[str | ChunkHandle]:
        """Split ``prompt`` into text pieces and the handles of registered chunks found in it (leftmost,
        longest match first; matches never overlap)."""
        with self._lock:
            matches = self._long_matches(prompt) + self._short_matches(prompt)
            by_text = dict(self._by_text)
        matches.sort(key=lambda m: (m[0], -len(m[1])))
        out: list[str | ChunkHandle] = []
        pos = 0
        for start, text in matches:
            if start < pos:
                continue
            if start > pos:
                out.append(prompt[pos:start])
            out.append(by_text[text])
            pos = start + len(text)
        if pos < len(prompt):
            out.append(prompt[pos:])
        return out

    def _long_matches(self, prompt: str) -> list[tuple[int, str]]:
        found = []
        get = self._by_anchor.get
        i, end = 0, len(prompt) - ANCHOR + 1
        while i < end:
            bucket = get(prompt[i : i + ANCHOR])
            if bucket:
                hits = [t for t in bucket if prompt.startswith(t, i)]
                if hits:
                    best = max(hits, key=len)
                    found.append((i, best))
                    i += len(best)
                    continue
            i += 1
        return found

    def _short_matches(self, prompt: str) -> list[tuple[int, str]]:
        found = []
        for text in self._short:
            start = prompt.find(text)
            while start >= 0:
                found.append((start, text))
                start = prompt.find(text, start + len(text))
        return found
