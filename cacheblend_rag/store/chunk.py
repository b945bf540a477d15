"""What the store holds (ChunkKV) and what callers hold (ChunkHandle)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .codec import PackedKV


@dataclass
class ChunkKV:
    """The per-layer KV of one block of tokens, keys stored *before* RoPE.

    k, v: [L, Hkv, T, D]. ``layer(l)`` gives one layer's (k, v): [Hkv, T, D] each. ``packed``: the int8
    form k and v were decoded from, when the store compresses (tiers that serialize write it instead).
    """

    k: torch.Tensor
    v: torch.Tensor
    packed: PackedKV | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(
                f"ChunkKV needs k and v of one shape [L, Hkv, T, D]; got {tuple(self.k.shape)}, {tuple(self.v.shape)}"
            )

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def to(self, dtype: torch.dtype) -> ChunkKV:
        return ChunkKV(self.k.to(dtype), self.v.to(dtype))


@dataclass(frozen=True)
class ChunkHandle:
    """A reference to one precomputed chunk: pass it to ``engine.generate`` in place of the chunk's text.

    ``key`` addresses the KV in the store; ``token_ids`` let the engine recompute the KV if the store lost
    it; ``model_fingerprint`` ties the handle to the model that made it. ``context_ids``: the tokens the chunk's
    KV was computed after (between the chunk prefix and the chunk; empty: alone), part of the key.
    """

    key: str
    text: str = field(repr=False)
    token_ids: tuple[int, ...] = field(repr=False)
    model_fingerprint: str = field(repr=False)
    context_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        preview = self.text[:40] + ("..." if len(self.text) > 40 else "")
        context = f", context={len(self.context_ids)} tokens" if self.context_ids else ""
        return f"ChunkHandle(key={self.key[:12]}..., n_tokens={self.n_tokens}{context}, text={preview!r})"

    def to_dict(self) -> dict:
        """JSON-safe form, e.g. for framework metadata."""
        out = {"key": self.key, "n_tokens": self.n_tokens, "model_fingerprint": self.model_fingerprint}
        if self.context_ids:
            out["context_ids"] = list(self.context_ids)
        return out
