"""OpenAI response shapes: chat and text completions, their stream chunks, usage, errors, server-sent events.

What a response says about reuse depends on who asks (``access.py``): with ``reveal`` the usage carries
``prompt_tokens_details.cached_tokens`` and the ``cacheblend`` field the strategy's figures; without it both
are left out (``"reuse": "hidden"``), since they tell whether a text in the prompt was registered. ``notes``
are added to the ``cacheblend`` field either way (e.g. a clamped max_tokens).
"""

from __future__ import annotations

import json
import time
import uuid

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(stats, reveal: bool = True) -> dict:
    """OpenAI usage; ``prompt_tokens_details.cached_tokens``: the prompt tokens whose KV was reused."""
    out = {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    }
    if reveal:
        out["prompt_tokens_details"] = {"cached_tokens": stats.reused_tokens}
    return out


def blend_report(stats, reveal: bool = True, notes: dict | None = None) -> dict:
    """What the engine reused and recomputed for one request (the ``cacheblend`` field of a response)."""
    if not reveal:
        return {"strategy": stats.strategy, "reuse": "hidden", **(notes or {})}
    return {
        "strategy": stats.strategy,
        "recompute_ratio": stats.recompute_ratio,
        "reused_tokens": stats.reused_tokens,
        "recomputed_tokens": stats.recomputed_tokens,
        "cached_tokens": stats.cached_tokens,
        "head_tokens": stats.head_tokens,
        "cache_hits": stats.cache_hits,
        "cache_misses": stats.cache_misses,
        "prefill_s": round(stats.prefill_s, 6),
        "ttft_s": round(stats.ttft_s, 6),
        "fallback": stats.fallback,  # why a prompt with chunks was computed in full, or None
        "guard": stats.guard,  # why the blend was run again with a larger share, or None
        **(notes or {}),
    }


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(payload: dict | str) -> str:
    """One server-sent event (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _Format:
    prefix = ""

    def __init__(self, model: str, reveal: bool = True, notes: dict | None = None) -> None:
        self.id = f"{self.prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.reveal, self.notes = reveal, notes

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _accounts(self, result) -> dict:
        return {
            "usage": usage(result.stats, self.reveal),
            "cacheblend": blend_report(result.stats, self.reveal, self.notes),
        }


class ChatFormat(_Format):
    """``chat.completion`` and ``chat.completion.chunk`` objects of one request."""

    prefix = "chatcmpl-"

    def full(self, result) -> dict:
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH[result.finish_reason]}
        return {**self._base("chat.completion"), "choices": [choice], **self._accounts(result)}

    def first_chunk(self) -> dict:
        return self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: dict | str, finish_reason: str | None = None) -> dict:
        if isinstance(delta, str):
            delta = {"content": delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def last_chunk(self, result) -> dict:
        return self.chunk({}, FINISH[result.finish_reason])

    def usage_chunk(self, result) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], **self._accounts(result)}


class CompletionFormat(_Format):
    """``text_completion`` objects of one request (streamed chunks have the same shape)."""

    prefix = "cmpl-"

    def full(self, result) -> dict:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": FINISH[result.finish_reason]}
        return {**self._base("text_completion"), "choices": [choice], **self._accounts(result)}

    def first_chunk(self) -> dict | None:
        return None

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def last_chunk(self, result) -> dict:
        return self.chunk("", FINISH[result.finish_reason])

    def usage_chunk(self, result) -> dict:
        return {**self._base("text_completion"), "choices": [], **self._accounts(result)}
