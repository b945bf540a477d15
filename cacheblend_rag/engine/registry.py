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

One exception, at a chunk's end only: byte-level BPE tokenizers (Qwen, GPT-2 style) merge punctuation with
the newlines after it, so a chunk ending ``"."`` followed by ``"\n\n"`` in the prompt ends in one token
``".\n\n"`` there. If the prompt's token at the chunk's last position decodes to the chunk's last token
followed by whitespace only, ``split(..., boundary=...)`` splits it at the chunk's edge (the chunk's own last
token, then the whitespace tokenized alone): the tokens explicit segments would give, since segments are
tokenized one by one. Only whitespace is split off this way, never text (``"..."`` after a chunk ending
``"."`` is not a match).

Texts of fewer than ``min_tokens`` tokens (``MIN_TOKENS``, 8, by default) are not registered: reusing them
saves less than loading them costs, and short token runs recur in unrelated text. They can still be passed
as explicit segments (``engine.generate([..., handle, ...])``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..store.chunk import ChunkHandle

MIN_TOKENS = 8
MAX_ANCHOR = 8


class ChunkRegistry:
    """Map of chunk texts to handles, searched by token ids, bounded to ``max_entries``: past it the least
    recently used text is evicted (a registration, a lookup or a match in ``split`` is a use)."""

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

    def __contains__(self, text: object) -> bool:
        """Whether ``text`` is registered (not a use: the eviction order stays as it is)."""
        return text in self._by_text

    def lookup(self, text: str) -> ChunkHandle | None:
        """The handle of a registered text, or None. A lookup is a use: the text becomes the most recently used."""
        with self._lock:
            handle = self._by_text.get(text)
            if handle is not None:
                self._by_text.move_to_end(text)
            return handle

    def split(
        self, token_ids: Sequence[int], boundary: Callable[[int, int], list[int] | None] | None = None
    ) -> list[list[int] | ChunkHandle]:
        """Split a prompt's token ids into runs to compute (lists of ids) and the handles of registered chunks
        whose token ids appear in it (leftmost, longest match first; matches never overlap).

        ``boundary(prompt_token, chunk_last_token)``: the ids of the text ``prompt_token`` holds after
        ``chunk_last_token`` when it starts with it, else None; lets a chunk match whose last token merged with
        the text after it (module docstring)."""
        ids = list(token_ids)
        out: list[list[int] | ChunkHandle] = []
        n, a = len(ids), self.anchor
        start = i = 0
        with self._lock:
            get = self._by_anchor.get
            while i + a <= n:
                best, rest = None, None
                for cand in get(tuple(ids[i : i + a])) or ():
                    if best is not None and len(cand) <= len(best):
                        continue
                    end = i + len(cand)
                    if tuple(ids[i:end]) == cand:
                        best, rest = cand, None
                    elif boundary is not None and end <= n and tuple(ids[i : end - 1]) == cand[:-1]:
                        tail = boundary(ids[end - 1], cand[-1])
                        if tail is not None:
                            best, rest = cand, tail
                if best is None:
                    i += 1
                    continue
                if i > start:
                    out.append(ids[start:i])
                handle = self._by_ids[best]
                self._by_text.move_to_end(handle.text)  # a match is a use: evicted last
                out.append(handle)
                i = start = i + len(best)
                if rest is not None:  # the merged token becomes the chunk's last token, then the rest
                    ids[i - 1 : i] = [best[-1], *rest]
                    n = len(ids)
        if start < n:
            out.append(ids[start:])
        return out
