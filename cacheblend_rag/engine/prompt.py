"""How the model's prompts are written: tokens, the tokens a prompt starts and ends with, the chat template, the
chunk prefix, and the prompt's head (where chunks may not be reused). A request made of these becomes token runs in
``runs.py``.

Chat messages are tokenized part by part, as chat-template servers do: the template's own text with its special
tokens, each message's content as text only (``split_special_tokens``), so a user who writes ``<|im_end|>`` in a
message gets those characters, not the control token: no forged system or assistant turn.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import cached_property

from ..store.chunk import ChunkHandle
from .segments import merge_text

logger = logging.getLogger(__name__)

SENTINEL = "\u2063CACHEBLEND-SEGMENTS\u2063"  # stands for the user message while the chat template is applied
SYSTEM_SENTINEL = "\u2063CACHEBLEND-SYSTEM\u2063"  # ... and for the system message's content


class PromptFormat:
    """The tokenizer's view of prompts. ``bos_ids``: the special tokens it puts before a prompt (e.g. Llama's
    BOS), prepended to every request; ``eos_ids``: the tokens that end a generation (the tokenizer's EOS and the
    model's ``generation_config.eos_token_id``)."""

    def __init__(self, tokenizer, generation_config=None) -> None:
        self.tokenizer = tokenizer
        self.bos_ids = added_prefix(tokenizer)
        self.eos_ids = eos_ids(tokenizer, generation_config)
        self.chunk_prefix: list[int] = []  # what the engine computes chunks after (``head_end`` reads it)
        self._whitespace: dict[int, bool] = {}
        self._text_backend = text_backend(tokenizer)
        self._text_lock = threading.Lock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without special tokens added (special tokens written in it are read)."""
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: a special token written in it (``<|im_end|>``) is its characters.

        A fast tokenizer's ``split_special_tokens=True`` flips a switch on its backend that every later call
        reads, so two threads tokenizing at once could read a message's ``<|im_end|>`` as the control token:
        text goes through a private copy of the backend with the switch always on instead."""
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        if self._text_backend is not None:
            return list(self._text_backend.encode(text, add_special_tokens=False).ids)
        with self._text_lock:  # a slow tokenizer: no shared backend, but keep its calls apart
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def is_whitespace(self, token_id: int) -> bool:
        """Whether a token is whitespace only (decoded alone; special tokens are not)."""
        known = self._whitespace.get(token_id)
        if known is None:
            text = self.tokenizer.decode([token_id])
            known = self._whitespace[token_id] = bool(text) and text.isspace()
        return known

    @cached_property
    def special_ids(self) -> frozenset[int]:
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        ids.update(i for i, token in added.items() if getattr(token, "special", False))
        return frozenset(ids)

    def chunk_prefix_ids(self, chunk_prefix: str | None, system: str | None = None) -> list[int]:
        """What chunks are computed after: how the prompts they will be reused in begin (APE's shared prefix).

        Default: the chat template's text before a user message (with ``system`` as the system prompt, else the
        template's default), else the tokens the tokenizer puts before a prompt (e.g. BOS), else a newline. Never
        a token prompts do not start with: Qwen reads a chunk computed after its ``<|endoftext|>`` (its nominal
        BOS) so differently that reusing it alone changes answers (docs/BENCHMARKS.md).
        """
        if system is not None:
            if chunk_prefix is not None:
                raise ValueError("pass chunk_prefix or system_prompt, not both (system_prompt makes the prefix)")
            if not isinstance(system, str):
                raise TypeError(f"system_prompt must be a str, got {type(system).__name__}")
            return self.tokenize(self.chat_segments([], system)[0])
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

    @cached_property
    def system_turn(self) -> tuple[list[int], list[int]] | None:
        """(opening, closing): how the chat template's prompts begin when they hold a system message (the tokens
        before the system content, cut after their last special token, so that text the template writes there,
        such as a date, does not matter) and the tokens between the system content and the first user content
        (whitespace tokens at its end dropped); None without a template that writes the system turn first."""
        if not self.has_chat_template:
            return None
        messages = [{"role": "system", "content": SYSTEM_SENTINEL}, {"role": "user", "content": SENTINEL}]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template without system messages
            logger.debug("no system turn in the chat template (%s)", exc)
            return None
        if (
            text.count(SYSTEM_SENTINEL) != 1
            or text.count(SENTINEL) != 1
            or text.index(SENTINEL) < text.index(SYSTEM_SENTINEL)
        ):
            return None
        before, rest = text.split(SYSTEM_SENTINEL)
        between = rest.split(SENTINEL)[0]
        opening, closing = self.tokenize(before), self.tokenize(between)
        marks = [i for i, t in enumerate(opening) if t in self.special_ids]
        while closing and self.is_whitespace(closing[-1]):
            closing.pop()
        if not marks or not closing:
            return None
        return opening[: marks[-1] + 1], closing

    def head_end(self, ids: Sequence[int]) -> int:
        """The first row of a prompt (token ids, BOS included) where a chunk's stored KV may be reused: after its
        head, the part that plays the role the chunk prefix played when the chunk was computed.

        - A prompt that starts with the chunk prefix: right after it (the chunk's own context).
        - A prompt in the chat template that starts with a system turn (``system_turn``): after the first user
          header, never inside the system prompt (none if the system turn never closes).
        - Any other prompt: after its first token (and BOS): a chunk is never the prompt's start, whose first
          token is the attention sink every later token reads (a chunk computed after a prefix holds no sink).
        """
        ids = list(ids)
        prefix = self.chunk_prefix
        if prefix and ids[: len(prefix)] == prefix:
            return len(prefix)
        bos = len(self.bos_ids) if self.bos_ids and ids[: len(self.bos_ids)] == self.bos_ids else 0
        turn = self.system_turn
        if turn is not None:
            opening, closing = turn
            for at in {0, bos}:
                if ids[at : at + len(opening)] == opening:
                    found = find(ids, closing, at + len(opening))
                    return len(ids) if found < 0 else found + len(closing)
        return bos + 1

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
        check_messages(messages, self.has_chat_template)
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat_parts(self, messages: Sequence[dict]) -> list[tuple[str, str | None]]:
        """``messages`` in the chat template (with the generation prompt) as parts in prompt order: (text, None) for
        the template's own text, (content, role) for each message's content."""
        check_messages(messages, self.has_chat_template)
        marks = [f"\u2063CACHEBLEND-MESSAGE-{i}\u2063" for i in range(len(messages))]
        marked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
        text = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        parts: list[tuple[str, str | None]] = []
        for mark, message in zip(marks, messages):
            if text.count(mark) != 1:
                raise ValueError("the chat template repeats or drops a message; format the prompt and pass prompt=...")
            before, text = text.split(mark)
            parts += [(before, None), (message["content"], message["role"])]
        parts.append((text, None))
        real = self.format_chat(messages)
        if "".join(p for p, _ in parts) != real:
            stripped = [(p.strip(), role) if role is not None else (p, None) for p, role in parts]
            if "".join(p for p, _ in stripped) != real:  # not only trimmed (Llama 3's template trims contents)
                raise ValueError(
                    "the chat template changes message contents; format the prompt yourself and pass prompt=..."
                )
            parts = stripped
        return [(p, role) for p, role in parts if p]

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """The token ids of chat ``messages`` in the template, each content tokenized as plain text."""
        ids: list[int] = []
        for text, role in self.chat_parts(messages):
            ids += self.tokenize(text) if role is None else self.tokenize_text(text)
        return ids


def text_backend(tokenizer):
    """A private copy of a fast tokenizer's backend that reads special tokens written in text as text, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    copy.no_truncation()
    copy.no_padding()
    return copy


def check_messages(messages: object, has_template: bool) -> None:
    """Chat messages must be a non-empty list of {"role": str, "content": str} dicts, for a chat template."""
    if not has_template:
        raise ValueError("this tokenizer has no chat template; format the prompt yourself and pass prompt=...")
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: pass at least one {'role': ..., 'content': ...} message")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or not isinstance(message.get("role"), str)
        ):
            raise ValueError(f"messages[{i}] must be a dict with str 'role' and str 'content', got {message!r}")


def find(ids: list[int], run: list[int], start: int = 0) -> int:
    """Index of the first occurrence of ``run`` in ``ids`` at or after ``start``, or -1."""
    k = len(run)
    first = run[0]
    for i in range(start, len(ids) - k + 1):
        if ids[i] == first and ids[i : i + k] == run:
            return i
    return -1


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
