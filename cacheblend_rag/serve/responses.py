"""OpenAI response shapes: chat and text completions, their stream chunks, usage, errors, server-sent events."""

from __future__ import annotations

import json
import time
import uuid

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(stats) -> dict:
    """OpenAI usage; ``prompt_tokens_details.cached_tokens``: the prompt tokens whose KV was reused."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
    }


def blend_report(stats) -> dict:
    """What the engine reused and recomputed for one request (the ``cacheblend`` field of a response)."""
    return {
        "strategy": stats.strategy,
        "recompute_ratio": stats.recompute_ratio,
        "reused_tokens": stats.reused_tokens,
        "recomputed_tokens": stats.recomputed_tokens,
        "cached_tokens": stats.cached_tokens,
        "cache_hits": stats.cache_hits,
        "cache_misses": stats.cache_misses,
        "prefill_s": round(stats.prefill_s, 6),
        "ttft_s": round(stats.ttft_s, 6),
    }


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(payload: dict | str) -> str:
    """One server-sent event (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class ChatFormat:
    """``chat.completion`` and ``chat.completion.chunk`` objects of one request."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, result) -> dict:
        return {
            **self._base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": FINISH[result.finish_reason],
                }
            ],
            "usage": usage(result.stats),
            "cacheblend": blend_report(result.stats),
        }

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
        return {
            **self._base("chat.completion.chunk"),
            "choices": [],
            "usage": usage(result.stats),
            "cacheblend": blend_report(result.stats),
        }


class CompletionFormat:
    """``text_completion`` objects of one request (streamed chunks have the same shape)."""

    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def full(self, result) -> dict:
        return {
            **self._base(),
            "choices": [
                {"index": 0, "text": result.text, "logprobs": None, "finish_reason": FINISH[result.finish_reason]}
            ],
            "usage": usage(result.stats),
            "cacheblend": blend_report(result.stats),
        }

    def first_chunk(self) -> dict | None:
        return None

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        return {
            **self._base(),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }

    def last_chunk(self, result) -> dict:
        return self.chunk("", FINISH[result.finish_reason])

    def usage_chunk(self, result) -> dict:
        return {**self._base(), "choices": [], "usage": usage(result.stats), "cacheblend": blend_report(result.stats)}
