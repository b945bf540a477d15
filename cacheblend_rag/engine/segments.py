"""A request's prompt as token runs: ``TokenRun`` (a run of prompt tokens, computed or taken from a chunk's stored
KV; not a fixed-size KV page as in vLLM), the segments that make them, and the prompt's length limit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..store.chunk import ChunkHandle


@dataclass
class TokenRun:
    """A run of prompt tokens: either text to compute or a cached chunk (rows ``offset`` .. ``offset + len - 1`` of
    the chunk's stored KV: a chunk found in a prompt without its edge whitespace, engine/registry.py)."""

    token_ids: list[int]
    handle: ChunkHandle | None = None
    start: int = 0
    offset: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


def merge_text(segments: Sequence[str | ChunkHandle]) -> list[str | ChunkHandle]:
    """Validate segment types and join adjacent strings (they are tokenized together)."""
    if isinstance(segments, (str, ChunkHandle)):
        segments = [segments]
    if isinstance(segments, (Mapping, set, frozenset)) or not isinstance(segments, Iterable):
        raise TypeError(
            f"segments must be a list of str (computed) and ChunkHandle (reused) items in prompt order, "
            f"got a {type(segments).__name__}"
        )
    out: list[str | ChunkHandle] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            if out and isinstance(out[-1], str):
                out[-1] += seg
            elif seg:
                out.append(seg)
        elif isinstance(seg, ChunkHandle):
            out.append(seg)
        else:
            raise TypeError(
                f"segment {i} is a {type(seg).__name__}; segments must be str (computed) or ChunkHandle (reused, "
                "from engine.precompute)"
            )
    return out


def place(runs: list[TokenRun]) -> int:
    """Assign each run its start row; return the prompt length."""
    pos = 0
    for run in runs:
        run.start = pos
        pos += len(run.token_ids)
    return pos


class ContextLengthExceeded(ValueError):
    """A prompt longer than the model's context window (``n_tokens``, ``context_window``)."""

    def __init__(self, n_tokens: int, context_window: int) -> None:
        super().__init__(
            f"the prompt has {n_tokens} tokens but the model's context window is {context_window}; "
            "retrieve fewer or shorter chunks, or shorten the prompt"
        )
        self.n_tokens, self.context_window = n_tokens, context_window


def check_length(n_tokens: int, context_window: int) -> None:
    """Raise ContextLengthExceeded if a prompt of ``n_tokens`` does not fit the context window."""
    if n_tokens > context_window:
        raise ContextLengthExceeded(n_tokens, context_window)
