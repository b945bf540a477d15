"""Decoding after the prefill: one token at a time on the fused cache, sampling, stop handling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels import apply_rope, selected_attention
from ..model.forward import ModelForward
from .kv_cache import KVCache


def decode_step(fwd: ModelForward, cache: KVCache, token: int, *, backend: str = "auto") -> torch.Tensor:
    """Append ``token`` at position ``cache.length``; return the next-token logits [vocab] (float32)."""
    pos = cache.length
    if pos >= cache.capacity:
        raise RuntimeError(f"KV cache full at {pos} tokens")
    device = cache.k.device
    positions = torch.tensor([pos], device=device)
    h = fwd.embed(torch.tensor([token], device=device))
    for layer in range(fwd.n_layers):
        q, k, v = fwd.qkv(layer, h, positions, backend=backend)
        cache.k[layer, :, pos : pos + 1] = apply_rope(k, positions, fwd.rope, backend=backend)
        cache.v[layer, :, pos : pos + 1] = v
        keys, values = cache.layer(layer, pos + 1)
        h = fwd.finish_layer(layer, h, selected_attention(q, positions, keys, values, fwd.scale, backend=backend))
    cache.length = pos + 1
    return fwd.logits(h)[0]


class Sampler:
    """Greedy when temperature == 0, else temperature + nucleus (top_p) sampling with an optional seed."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature >= 0
            or not math.isfinite(temperature)
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
            raise ValueError(f"seed must be an int (or None for an unseeded sampler), got {seed!r}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] -> token id."""
        if self.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if not isinstance(stop, (str, list, tuple, set, frozenset)):
        raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in items):
        raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    return items


class TextStreamer:
    """Turns generated token ids into text pieces, holding back bytes of unfinished characters and any
    tail that could still become a stop string; ``done`` once a stop string appeared."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False

    def push(self, token: int) -> str:
        """Add one token; return the text that became final."""
        self.token_ids.append(token)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_index()
        if cut is not None:
            self.text = self.text[:cut]
            self.done = True
            return self._emit(len(self.text))
        end = len(self.text)
        if self.text.endswith("\ufffd"):
            end -= 1
        end -= self._held_tail(self.text[:end])
        return self._emit(max(end, self.emitted))

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def _stop_index(self) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
