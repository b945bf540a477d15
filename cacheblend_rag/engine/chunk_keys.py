"""Content-addressed chunk handles: a chunk's key chains the model fingerprint, the chunk prefix (the registry scope
salting it), the chunk's context (the tokens its KV was computed after, if any) and the chunk's tokens
(``store/keys.py``), so any change to one of them is another key, never a wrong entry, and the same text in two
scopes is two entries (no scope learns what another one stored). A chunk computed alone keeps the key it always had."""

from __future__ import annotations

from collections.abc import Sequence

from ..store import ChunkHandle, chain_key
from ..store.keys import check_scope, scope_root
from .prompt import PromptFormat


class ChunkKeys:
    """The handles of one model's chunks. prompt_format: how its prompts are tokenized (chunks are computed after
    its ``chunk_prefix``); fingerprint: the model's (``store.model_fingerprint``)."""

    def __init__(self, prompt_format: PromptFormat, fingerprint: str) -> None:
        self.prompt_format = prompt_format
        self.fingerprint = fingerprint
        self.prefix_ids = list(prompt_format.chunk_prefix)
        self.prefix_key = chain_key(fingerprint, None, self.prefix_ids)

    def prefix_key_for(self, scope: str | None) -> str:
        """The key the chunks of ``scope`` chain from (the default scope's: ``prefix_key``)."""
        if check_scope(scope) is None:
            return self.prefix_key
        return chain_key(self.fingerprint, scope_root(scope), self.prefix_ids)

    def key(self, token_ids: Sequence[int], scope: str | None = None, context_ids: Sequence[int] = ()) -> str:
        """The key of a chunk's KV: computed after ``context_ids`` (none: alone) in ``scope``."""
        parent = self.prefix_key_for(scope)
        if context_ids:
            parent = chain_key(self.fingerprint, parent, context_ids)
        return chain_key(self.fingerprint, parent, token_ids)

    def context_ids(self, context: Sequence[str]) -> tuple[int, ...]:
        """The tokens of context texts, each tokenized as a chunk is, one after another."""
        return tuple(t for text in context for t in self.prompt_format.tokenize(text))

    def handle(self, text: str, scope: str | None = None, context_ids: Sequence[int] = ()) -> ChunkHandle:
        """The handle a chunk text would have in ``scope``, computed after ``context_ids`` (computes nothing)."""
        ids = self.prompt_format.tokenize(text)
        context_ids = tuple(int(t) for t in context_ids)
        return ChunkHandle(self.key(ids, scope, context_ids), text, tuple(ids), self.fingerprint, context_ids)

    def check(self, handle: object, scope: str | None = None) -> ChunkHandle:
        """``handle`` if it is one of this model's, with a key that matches its tokens in ``scope``; else a clear
        error."""
        if not isinstance(handle, ChunkHandle):
            raise TypeError(f"expected a ChunkHandle from engine.precompute, got {type(handle).__name__}")
        if handle.model_fingerprint != self.fingerprint:
            raise ValueError(
                f"unknown handle {handle.key[:12]}...: it was made by another model or tokenizer; "
                "call engine.precompute([...]) on this engine to get handles for it"
            )
        if self.key(handle.token_ids, scope, handle.context_ids) != handle.key:
            raise ValueError(
                f"unknown handle {handle.key[:12]}...: its key does not match its tokens and context in this registry "
                "scope; "
                "use the handles engine.precompute returns (with the same scope=)"
            )
        return handle
