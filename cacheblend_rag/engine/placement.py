"""Where a chunk's stored KV may be reused in a prompt: only where the context it was computed in still holds.

A chunk's KV is computed after the chunk prefix (how prompts begin: the chat template's system turn and user
header, engine/prompt.py) and reused wherever the chunk's tokens stand in a prompt. Two places break that:

- **the prompt's head** (``PromptFormat.head_end``): a chunk at the prompt's first token would take the place of
  the attention sink every later token reads, with KV that never was one (a completion prompt that is exactly a
  chunk then continues as nonsense), and a chunk inside the system prompt would give every later token of the
  prompt a system prompt read as if it followed itself (registering the template's default system prompt as a
  chunk changed other users' answers). Chunks after the head, after any system prompt, are fine:
  docs/DESIGN.md ("Where a chunk may be reused") has the measurement.
- **the prompt's end**: the model answers from the last rows; a chunk with nothing after it that the model reads
  (only whitespace, or nothing) would make the first answer token depend on KV read out of its context.

A chunk run that breaks a rule is computed like text: it keeps its tokens (the model sees the same prompt) and
loses its handle. The request's stats count these (``unplaced_chunks``); one left with no chunk is a full
recompute, and ``stats.fallback`` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .segments import TokenRun

FALLBACK = "no chunk can be reused where it stands (the prompt's head or end): computed in full"


def place_chunks(runs: list[TokenRun], head_end: int, whitespace: Callable[[int], bool]) -> tuple[list[TokenRun], int]:
    """``runs`` with the handle dropped from every chunk run that starts before row ``head_end`` or has no computed
    token after it that is not whitespace (``whitespace(token_id)``; a dropped chunk is computed, so the chunks
    before it keep theirs); and how many were dropped."""
    out = list(runs)
    dropped = 0
    read_after = False  # a computed, non-whitespace token comes later in the prompt
    for i in range(len(out) - 1, -1, -1):
        run = out[i]
        if run.handle is not None and (run.start < head_end or not read_after):
            run = out[i] = replace(run, handle=None, offset=0)  # computed: the model reads it like text
            dropped += 1
        if run.handle is None and not read_after:
            read_after = not all(whitespace(t) for t in run.token_ids)
    return out, dropped
