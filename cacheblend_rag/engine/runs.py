"""A request (segments, a prompt string or chat messages) turned into placed token runs (``TokenRun``: text to
compute, or rows of a chunk's stored KV), and runs passed back (``engine.blocks(...)``, then ``blocks=``) checked."""

from __future__ import annotations

from collections.abc import Sequence

from ..store.chunk import ChunkHandle
from .chunk_keys import ChunkKeys
from .registry import ChunkPart, ChunkRegistry
from .segments import TokenRun, check_length, merge_text, place


def token_runs(
    keys: ChunkKeys,
    registry: ChunkRegistry,
    segments: Sequence[str | ChunkHandle] | None = None,
    prompt: str | None = None,
    messages: Sequence[dict] | None = None,
    *,
    scope: str | None = None,
    context_window: int,
) -> list[TokenRun]:
    """The placed token runs of a request, given ``segments`` (text tokenized segment by segment, chunk handles
    checked by ``keys`` in registry ``scope`` and kept), a ``prompt`` string (tokenized whole; runs equal to a chunk in
    ``registry`` reuse its KV, looked for after the prompt's head, ``head_end``, and before its last token that
    is not whitespace: where a chunk may be reused, engine/placement.py) or chat ``messages`` (``chat_parts``:
    the template's text tokenized with its special tokens, each content as plain text, chunks found in every
    content but the system message's); BOS first if the tokenizer adds one and the prompt lacks it. Raises
    ValueError for an empty prompt or one longer than ``context_window``."""
    fmt = keys.prompt_format
    if sum(x is not None for x in (segments, prompt, messages)) != 1:
        raise ValueError("pass exactly one of segments, prompt=... or messages=...")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = fmt.tokenize(prompt)
        lead = fmt.bos_ids if fmt.bos_ids and ids[: len(fmt.bos_ids)] != fmt.bos_ids else []
        skip = max(0, fmt.head_end(lead + ids) - len(lead))  # the head is never searched ...
        end = len(ids) - 1  # ... nor the last token that is not whitespace and what follows it
        while end > skip and fmt.is_whitespace(ids[end]):
            end -= 1
        end = max(skip, end)
        parts = [ids[:skip], *registry.split(ids[skip:end], fmt.boundary), ids[end:]]
    elif messages is not None:
        parts = []
        for text, role in fmt.chat_parts(messages):
            if role is None:
                parts.append(fmt.tokenize(text))
            elif role == "system":
                parts.append(fmt.tokenize_text(text))
            else:
                parts += registry.split(fmt.tokenize_text(text), fmt.boundary)
    else:
        parts = merge_text(segments)
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(TokenRun(fmt.tokenize(part)))
        elif isinstance(part, list):
            out.append(TokenRun(part))
        elif isinstance(part, ChunkPart):
            out.append(TokenRun(list(part.token_ids), keys.check(part.handle, scope), offset=part.offset))
        else:
            out.append(TokenRun(list(keys.check(part, scope).token_ids), part))
    out = [r for r in out if r.token_ids]
    first = out[0].token_ids if out else []
    if fmt.bos_ids and first[: len(fmt.bos_ids)] != fmt.bos_ids:
        out.insert(0, TokenRun(list(fmt.bos_ids)))
    n = place(out)
    if not any(r.handle is not None or r.token_ids != fmt.bos_ids for r in out):
        raise ValueError("the prompt is empty: give at least one non-empty text segment or chunk")
    check_length(n, context_window)
    return out


def check_runs(
    blocks: object, keys: ChunkKeys, scope: str | None, context_window: int, vocab_size: int
) -> list[TokenRun]:
    """``blocks`` if they are what ``engine.blocks`` returns: TokenRuns placed one after the other, token ids in the
    vocabulary, each chunk run's tokens its handle's (the handle is this engine's, in the request's ``scope``), no
    longer than ``context_window``; else a clear error. Costs a pass over the token ids."""
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, TokenRun) for b in blocks):
        raise TypeError("blocks must be the non-empty list of TokenRuns that engine.blocks(...) returned")
    unchanged = "pass the list engine.blocks(...) returned, unchanged"
    pos = 0
    for i, block in enumerate(blocks):
        ids = block.token_ids
        if not isinstance(ids, list) or not ids or block.start != pos:
            raise ValueError(f"blocks[{i}] is empty or not placed after blocks[{i - 1}]; {unchanged}")
        if not all(type(t) is int and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"blocks[{i}] holds token ids outside the vocabulary (0..{vocab_size - 1})")
        if block.handle is not None:
            handle = keys.check(block.handle, scope)
            if block.offset < 0 or tuple(ids) != handle.token_ids[block.offset : block.offset + len(ids)]:
                raise ValueError(f"blocks[{i}]'s token ids are not its chunk's; {unchanged}")
        elif block.offset:
            raise ValueError(f"blocks[{i}] has an offset but no chunk; {unchanged}")
        pos += len(ids)
    check_length(pos, context_window)
    return blocks
