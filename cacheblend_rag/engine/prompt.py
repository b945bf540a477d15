"""How the model's prompts are written: tokens, the tokens a prompt starts and ends with, the chat template, the
chunk prefix, and a request's segments turned into placed token blocks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ..store.chunk import ChunkHandle
from .registry import ChunkRegistry
from .segments import Block, merge_text, place

logger = logging.getLogger(__name__)

SENTINEL = "\u2063CACHEBLEND-SEGMENTS\u2063"  # stands for the user message while the chat template is applied


class PromptFormat:
    """The tokenizer's view of prompts. ``bos_ids``: the special tokens it puts before a prompt (e.g. Llama's
    BOS), prepended to every request; ``eos_ids``: the tokens that end a generation (the tokenizer's EOS and the
    model's ``generation_config.eos_token_id``)."""

    def __init__(self, tokenizer, generation_config=None) -> None:
        self.tokenizer = tokenizer
        self.bos_ids = added_prefix(tokenizer)
        self.eos_ids = eos_ids(tokenizer, generation_config)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chunk_prefix_ids(self, chunk_prefix: str | None) -> list[int]:
        """What chunks are computed after: how the prompts they will be reused in begin (APE's shared prefix).

        Default: the chat template's text before a user message (system prompt included), else the tokens the
        tokenizer puts before a prompt (e.g. BOS), else a newline. Never a token prompts do not start with: Qwen
        reads a chunk computed after its ``<|endoftext|>`` (its nominal BOS) so differently that reusing it
        alone changes answers (docs/BENCHMARKS.md).
        """
        if chunk_prefix is not None:
            ids = self.tokenize(chunk_prefix)
            if not ids:
                raise ValueError(f"chunk_prefix {chunk_prefix!r} has no tokens; pass a non-empty text or None")
            return ids
        try:
            header = self.chat_segments([])[0] if self.has_chat_template else ""
        except Exception as exc:  # a template that needs more than one user message: fall back
            logger.debug("no chat header for the chunk prefix (%s)", exc)
            header = ""
        if header:
            return self.tokenize(header)
        return list(self.bos_ids) or self.tokenize("\n")

    def boundary(self, merged: int, last: int) -> list[int] | None:
        """Ids of the whitespace token ``merged`` holds after the text of token ``last``, if it is that text
        followed by whitespace only (a chunk's last token merged with the newlines after it:
        engine/registry.py), else None."""
        whole, head = self.tokenizer.decode([merged]), self.tokenizer.decode([last])
        rest = whole[len(head) :]
        if merged == last or not head or not whole.startswith(head) or not rest or not rest.isspace():
            return None
        return self.tokenize(rest)

    def chat_segments(self, segments: Sequence[str | ChunkHandle] | str, system: str | None = None) -> list:
        """Wrap segments in the model's chat template as one user message, chunk texts unchanged."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; pass segments to generate() directly")
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": SENTINEL})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(SENTINEL) != 1:
            raise ValueError("the chat template changes the message text; build the prompt segments yourself")
        before, after = text.split(SENTINEL)
        return [before, *merge_text(segments), after]

    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for chat ``messages`` ([{"role": ..., "content": ...}]) in the model's template."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself and pass prompt=...")
        if not messages:
            raise ValueError("messages is empty: pass at least one {'role': ..., 'content': ...} message")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and str 'content', got {message!r}")
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def blocks(
        self,
        segments: Sequence[str | ChunkHandle] | None,
        prompt: str | None,
        registry: ChunkRegistry,
        check_handle: Callable[[ChunkHandle], ChunkHandle],
        context_window: int,
    ) -> list[Block]:
        """Placed token blocks of a request, given ``segments`` (text tokenized segment by segment, chunk handles
        checked by ``check_handle`` and kept) or a ``prompt`` string (tokenized whole; runs equal to a chunk in
        ``registry`` reuse its KV); BOS first if the tokenizer adds one and the prompt lacks it. Raises
        ValueError for an empty prompt or one longer than ``context_window``."""
        if (segments is None) == (prompt is None):
            raise ValueError("pass either segments or prompt=..., not both or neither")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            runs = registry.split(self.tokenize(prompt), self.boundary)  # token runs and the chunks found
        else:
            runs = merge_text(segments)
        blocks = []
        for run in runs:
            if isinstance(run, str):
                blocks.append(Block(self.tokenize(run)))
            elif isinstance(run, list):
                blocks.append(Block(run))
            else:
                blocks.append(Block(list(check_handle(run).token_ids), run))
        blocks = [b for b in blocks if b.token_ids]
        first = blocks[0].token_ids if blocks else []
        if self.bos_ids and first[: len(self.bos_ids)] != self.bos_ids:
            blocks.insert(0, Block(list(self.bos_ids)))
        n = place(blocks)
        if not any(b.handle is not None or b.token_ids != self.bos_ids for b in blocks):
            raise ValueError("the prompt is empty: give at least one non-empty text segment or chunk")
        if n > context_window:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context window is {context_window}; "
                "retrieve fewer or shorter chunks, or shorten the prompt"
            )
        return blocks


def added_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a prompt (e.g. Llama's BOS)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    return []


def eos_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """The tokenizer's EOS and the model's ``generation_config.eos_token_id`` (one id or a list)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if extra is not None:
        ids.update(int(x) for x in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return frozenset(ids)
