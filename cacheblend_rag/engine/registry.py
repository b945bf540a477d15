"""Chunk registry: finding registered chunks in a finished prompt, on the prompt's own tokens.

Frameworks hand the LLM one string. The engine tokenizes the whole prompt as usual, and the registry looks
for runs of its token ids that equal a registered chunk's token ids (any order, any surrounding template):
each position is looked up by its first ``anchor`` token ids, and a candidate matches only if all its ids
follow. Such a run reuses the chunk's stored KV; every other token is computed.

Because matching works on the prompt's own tokenization, a match never changes how the prompt is tokenized:
a chunk is never found inside a word, inside a special token such as ``<|im_start|>``, or where the text
before it merges with its first token (after ``"Context: "`` a chunk starting ``"The"`` is tokenized as
``" The"``; put chunks on their own line, e.g. ``"Context:\\n"``, as framework templates do). There it is
simply computed: slower, never different.

Texts of fewer than ``min_tokens`` tokens (``MIN_TOKENS``, 8, by default) are not registered: reusing them
saves less than loading them costs, and short token runs recur in unrelated text. They can still be passed
as explicit segments (``engine.generate([..., handle, ...])``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from ..store.chunk import ChunkHandle

MIN_TOKENS = 8
MAX_ANCHOR = 8


class ChunkRegistry:
    """LRU-bounded map of chunk texts to handles, searched by token ids."""

    def __init__(self, max_entries: int = 50_000, min_tokens: int = MIN_TOKENS) -> None:
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be an int >= 1, got {min_tokens!r}")
        self.max_entries = max_entries
        self.min_tokens = min_tokens
        self.anchor = min(min_tokens, MAX_ANCHOR)
        self._by_text: OrderedDict[str, ChunkHandle] = OrderedDict()
        self._by_ids: dict[tuple[int, ...], ChunkHandle] = {}
        self._by_anchor: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_text)

    def register(self, handle: ChunkHandle) -> bool:
        """Register ``handle``; False (and nothing registered) if its text is shorter than ``min_tokens``."""
        text, ids = handle.text, tuple(handle.token_ids)
        if not text or len(ids) < self.min_tokens:
            return False
        with self._lock:
            old = self._by_text.pop(text, None)
            if old is not None:
                self._forget(old)
            self._by_text[text] = handle
            self._by_ids[ids] = handle
            self._by_anchor.setdefault(ids[: self.anchor], set()).add(ids)
            while len(self._by_text) > self.max_entries:
                _, evicted = self._by_text.popitem(last=False)
                self._forget(evicted)
        return True

    def _forget(self, handle: ChunkHandle) -> None:
        ids = tuple(handle.token_ids)
        if self._by_ids.get(ids) is not handle:  # another text with the same tokens took its place
            return
        del self._by_ids[ids]
        bucket = self._by_anchor.get(ids[: self.anchor])
        if bucket is not None:
            bucket.discard(ids)
            if not bucket:
                del self._by_anchor[ids[: self.anchor]]

    def lookup(self, text: str) -> ChunkHandle | None:
        with self._lock:
            return self._by_text.get(text)

    def split(self, token_ids: Sequence[int]) -> list[list[int] | ChunkHandle]:
        """Split a prompt's token ids into runs to compute (lists of ids) and the handles of registered chunks
        whose token ids appear in it (leftmost, longest match first; matches never overlap)."""
        ids = list(token_ids)
        out: list[list[int] | ChunkHandle] = []
        n, a = len(ids), self.anchor
        start = i = 0
        with self._lock:
            get = self._by_anchor.get
            while i + a <= n:
                bucket = get(tuple(ids[i : i + a]))
                best = None
                for cand in bucket or ():
                    if (best is None or len(cand) > len(best)) and tuple(ids[i : i + len(cand)]) == cand:
                        best = cand
                if best is None:
                    i += 1
                    continue
                if i > start:
                    out.append(ids[start:i])
                out.append(self._by_ids[best])
                i = start = i + len(best)
        if start < n:
            out.append(ids[start:])
        return out
