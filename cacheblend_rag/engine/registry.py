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

Edge whitespace. A chunk text that starts or ends in whitespace (``"Title\n\ntext\n\n"``) tokenizes
differently there once text follows it in a prompt (``"\n\n"`` alone is one token, before ``"Question"`` two), so
with ``whitespace=`` (a predicate on token ids: the token is whitespace only) a chunk is looked for by its
*core*, its tokens without the whitespace-only tokens at its edges. Where the prompt's tokens around the core equal
the chunk's edge tokens they are part of the match (the whole chunk, as before); where they do not, only the core
is (a ``ChunkPart``: those rows of the chunk's stored KV) and the prompt's own whitespace tokens are computed.

Texts with fewer than ``min_tokens`` tokens besides edge whitespace (``MIN_TOKENS``, 8, by default) are not
registered: reusing them saves less than loading them costs, and short token runs recur in unrelated text. They
can still be passed as explicit segments (``engine.generate([..., handle, ...])``).

Eviction: the registry keeps at most ``max_entries`` texts and forgets the least recently used one (registered
or found in a prompt) first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..store.chunk import ChunkHandle

MIN_TOKENS = 8
MAX_ANCHOR = 8


@dataclass(frozen=True)
class ChunkPart:
    """Rows ``offset`` .. ``offset + n_tokens - 1`` of a registered chunk: the part a prompt holds (its core, maybe
    with some of its edge whitespace) when the prompt tokenizes the chunk's edge whitespace differently."""

    handle: ChunkHandle
    offset: int
    n_tokens: int

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.handle.token_ids[self.offset : self.offset + self.n_tokens]


@dataclass(frozen=True)
class _Entry:
    handle: ChunkHandle
    lead: int  # whitespace-only tokens before the core
    trail: int  # ... and after it

    @property
    def core(self) -> tuple[int, ...]:
        ids = self.handle.token_ids
        return tuple(ids[self.lead : len(ids) - self.trail])


class ChunkRegistry:
    """Map of chunk texts to handles, searched by token ids, bounded to ``max_entries``: past it the least
    recently used text is evicted (a registration, a lookup or a match in ``split`` is a use).

    whitespace(token_id): whether a token is whitespace only (``PromptFormat.is_whitespace``); None: chunks are
    matched with their edge tokens only (no core matching, module docstring).
    """

    def __init__(
        self,
        max_entries: int = 50_000,
        min_tokens: int = MIN_TOKENS,
        *,
        whitespace: Callable[[int], bool] | None = None,
    ) -> None:
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be an int >= 1, got {min_tokens!r}")
        self.max_entries = max_entries
        self.min_tokens = min_tokens
        self.whitespace = whitespace
        self.anchor = min(min_tokens, MAX_ANCHOR)
        self._by_text: OrderedDict[str, ChunkHandle] = OrderedDict()  # least recently used first
        self._by_ids: dict[tuple[int, ...], _Entry] = {}
        self._by_anchor: dict[tuple[int, ...], set[tuple[int, ...]]] = {}  # first ``anchor`` ids of a core
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_text)

    def _entry(self, handle: ChunkHandle) -> _Entry:
        ids = handle.token_ids
        lead = trail = 0
        if self.whitespace is not None:
            while lead < len(ids) and self.whitespace(ids[lead]):
                lead += 1
            while trail < len(ids) - lead and self.whitespace(ids[len(ids) - 1 - trail]):
                trail += 1
        return _Entry(handle, lead, trail)

    def register(self, handle: ChunkHandle) -> bool:
        """Register ``handle``; False (and nothing registered) if its text has fewer than ``min_tokens`` tokens
        besides edge whitespace."""
        text, ids = handle.text, tuple(handle.token_ids)
        entry = self._entry(handle)
        if not text or len(entry.core) < self.min_tokens:
            return False
        with self._lock:
            old = self._by_text.pop(text, None)
            if old is not None:
                self._forget(old)
            self._by_text[text] = handle
            self._by_ids[ids] = entry
            self._by_anchor.setdefault(entry.core[: self.anchor], set()).add(ids)
            while len(self._by_text) > self.max_entries:
                _, evicted = self._by_text.popitem(last=False)
                self._forget(evicted)
        return True

    def _forget(self, handle: ChunkHandle) -> None:
        ids = tuple(handle.token_ids)
        entry = self._by_ids.get(ids)
        if entry is None or entry.handle is not handle:  # another text with the same tokens took its place
            return
        del self._by_ids[ids]
        anchor = entry.core[: self.anchor]
        bucket = self._by_anchor.get(anchor)
        if bucket is not None:
            bucket.discard(ids)
            if not bucket:
                del self._by_anchor[anchor]

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
    ) -> list[list[int] | ChunkHandle | ChunkPart]:
        """Split a prompt's token ids into runs to compute (lists of ids) and the registered chunks whose tokens
        appear in it: a ChunkHandle where the whole chunk does, a ChunkPart where only its core (and part of its
        edge whitespace) does (leftmost, longest match first; matches never overlap). A match counts as a use of
        the chunk (it becomes the most recently used).

        ``boundary(prompt_token, chunk_last_token)``: the ids of the text ``prompt_token`` holds after
        ``chunk_last_token`` when it starts with it, else None; lets a chunk match whose last token merged with
        the text after it (module docstring)."""
        ids = list(token_ids)
        out: list[list[int] | ChunkHandle | ChunkPart] = []
        n, a = len(ids), self.anchor
        start = i = 0
        with self._lock:
            get = self._by_anchor.get
            while i + a <= n:
                best = None  # (rows matched, first row, end row, entry, ids after a split token)
                for cand in get(tuple(ids[i : i + a])) or ():
                    match = self._match(ids, i, start, self._by_ids[cand], boundary)
                    if match is not None and (best is None or match[0] > best[0]):
                        best = match
                if best is None:
                    i += 1
                    continue
                _, first, end, entry, rest = best
                if first > start:
                    out.append(ids[start:first])
                handle = entry.handle
                if first == i - entry.lead and end - first == handle.n_tokens:
                    out.append(handle)
                else:
                    out.append(ChunkPart(handle, entry.lead - (i - first), end - first))
                self._by_text.move_to_end(handle.text)
                i = start = end
                if rest is not None:  # the merged token becomes the core's last token, then the rest
                    ids[end - 1 : end] = [entry.core[-1], *rest]
                    n = len(ids)
        if start < n:
            out.append(ids[start:])
        return out

    @staticmethod
    def _match(ids: list[int], i: int, start: int, entry: _Entry, boundary):
        """Where ``entry``'s core starts at row ``i`` of ``ids`` (not before row ``start``): (rows matched, first
        row, end row, entry, whitespace ids split off the last core token or None), or None."""
        core, chunk = entry.core, entry.handle.token_ids
        end = i + len(core)
        rest = None
        if tuple(ids[i:end]) != core:
            if boundary is None or end > len(ids) or tuple(ids[i : end - 1]) != core[:-1]:
                return None
            rest = boundary(ids[end - 1], core[-1])
            if rest is None:
                return None
        first = i
        lead = chunk[: entry.lead]
        if lead and i - len(lead) >= start and tuple(ids[i - len(lead) : i]) == tuple(lead):
            first = i - len(lead)
        trail = chunk[len(chunk) - entry.trail :] if entry.trail else ()
        if rest is None and trail and tuple(ids[end : end + len(trail)]) == tuple(trail):
            end += len(trail)
        return end - first, first, end, entry, rest
