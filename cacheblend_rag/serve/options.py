"""The server's limits and defaults, one object (``cacheblend serve``'s options of the same names; docs/SERVE.md).

Sizes are checked before any work: a body by its bytes as it arrives, a prompt by its bytes before it is
tokenized (a bound derived from the context window, ``BYTES_PER_TOKEN`` bytes per token: far more than any
tokenizer packs into a token of ordinary text), chunk texts by their bytes, then by their tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerOptions:
    """model_name: the id clients send (default: the engine's name).
    max_active: requests decoding together in one batch (fewer when their KV would pass kv_memory); max_queue:
        requests that may wait beyond those (then 429).
    kv_memory: the batch's KV memory: bytes (an int), a share of the device's memory (a float in (0, 1]), or None
        (a fifth of it); a request is admitted when its prompt and max_tokens fit beside the running ones.
    prefill_budget: rows x layers of a new request's prefill run between two decoding steps of the batch (None:
        32 prompt rows through every layer); lower bounds the running streams' inter-token latency tighter, higher
        gives a new request its first token sooner.
    max_tokens: the most tokens one answer may have: a request asking for more is clamped (and told so);
        default_max_tokens: a request's max_tokens when it sends none (default: max_tokens; never above it).
    max_prompt_bytes: the longest prompt, in UTF-8 bytes, checked before tokenizing (413; default: the context
        window x BYTES_PER_TOKEN); max_body_bytes: the largest request body (413; default: twice the larger of
        max_prompt_bytes and the bytes max_chunk_tokens may have, at least 1 MiB: room for JSON's escapes, and
        no more, since the body is parsed on the event loop).
    max_chunk_texts, max_chunk_tokens: per POST /v1/chunks (413); chunk_quota_texts, chunk_quota_tokens: the
        distinct chunks (and their tokens) one key may register in this process's life (429; the admin key is
        exempt; 0: no quota).
    body_timeout: seconds a client has to send a request's whole body (408).
    shutdown_grace: seconds running requests get to finish once the server is told to stop; waiting ones get
        503 at once, and those still running then end with a 503 (or an error event in a stream).
    """

    model_name: str | None = None
    max_active: int = 16
    max_queue: int = 32
    kv_memory: int | float | None = None
    prefill_budget: int | None = None
    max_tokens: int = 256
    default_max_tokens: int | None = None
    max_prompt_bytes: int | None = None
    max_body_bytes: int | None = None
    max_chunk_texts: int = 256
    max_chunk_tokens: int = 65_536
    chunk_quota_texts: int = 10_000
    chunk_quota_tokens: int = 2_000_000
    body_timeout: float = 30.0
    shutdown_grace: float = 10.0

    def __post_init__(self) -> None:
        at_least = {
            "max_active": 1,
            "max_queue": 0,
            "max_tokens": 1,
            "default_max_tokens": 1,
            "max_prompt_bytes": 1,
            "max_body_bytes": 1,
            "max_chunk_texts": 1,
            "max_chunk_tokens": 1,
            "chunk_quota_texts": 0,
            "chunk_quota_tokens": 0,
            "prefill_budget": 1,
        }
        optional = ("default_max_tokens", "max_prompt_bytes", "max_body_bytes", "prefill_budget")
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        memory = self.kv_memory
        if memory is not None and (
            isinstance(memory, bool)
            or not isinstance(memory, (int, float))
            or not (memory > 0 and (isinstance(memory, int) or memory <= 1))
        ):
            raise ValueError(f"kv_memory must be bytes (an int > 0) or a share of the memory in (0, 1], got {memory!r}")
        for name in ("body_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value > 0 and math.isfinite(value))
            ):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")

    @classmethod
    def of(cls, options: dict) -> ServerOptions:
        """From keyword options; an unknown one is a TypeError naming the known ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown server option(s) {unknown}; the options are {', '.join(sorted(names))}")
        return cls(**options)

    def resolved(self, context_window: int, engine_name: str) -> ServerOptions:
        """These options with every default that depends on the engine filled in."""
        prompt_bytes = self.max_prompt_bytes or context_window * BYTES_PER_TOKEN
        return replace(
            self,
            model_name=self.model_name or engine_name,
            default_max_tokens=min(self.default_max_tokens or self.max_tokens, self.max_tokens),
            max_prompt_bytes=prompt_bytes,
            max_body_bytes=self.max_body_bytes or default_body_bytes(prompt_bytes, self.max_chunk_tokens),
        )


def default_body_bytes(max_prompt_bytes: int, max_chunk_tokens: int) -> int:
    """The largest body a request needs: twice its largest text (a prompt, or a registration's chunk texts, which
    are checked at BYTES_PER_TOKEN bytes per token) for JSON's escapes, at least MIN_BODY_BYTES. Not more: a body
    is parsed on the event loop, which answers nothing else meanwhile (json.loads of a 16 MB object took 2 s)."""
    return max(MIN_BODY_BYTES, 2 * max(max_prompt_bytes, max_chunk_tokens * BYTES_PER_TOKEN))
