"""Per-token KV deviation between freshly computed and cached K or V, and top-k token selection.

``d[t] = sum over heads and head_dim of (fresh[t] - cached[t])^2`` accumulated in float32, for tokens
that came from the cache; tokens that did not get ``-inf`` so a top-k never picks them (cacheblend
recomputes them anyway). The top-k stays in torch: it is a tiny fraction of the blend's time.
"""

from __future__ import annotations

import torch

from .backend import check, resolve_backend


def kv_deviation_torch(fresh: torch.Tensor, cached: torch.Tensor, from_cache: torch.Tensor) -> torch.Tensor:
    """Reference. fresh, cached: [H, T, D]; from_cache: [T] bool -> [T] float32."""
    diff = fresh.float() - cached.float()
    dev = diff.square().sum(dim=(0, 2))
    return dev.masked_fill(~from_cache, float("-inf"))


def kv_deviation(
    fresh: torch.Tensor, cached: torch.Tensor, from_cache: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Squared deviation per token. fresh, cached: [H, T, D]; from_cache: [T] bool -> [T] float32."""
    check(fresh.dim() == 3 and fresh.shape == cached.shape,
          f"fresh and cached must both be [heads, tokens, head_dim]; got {tuple(fresh.shape)} and "
          f"{tuple(cached.shape)}")  # fmt: skip
    check(from_cache.shape == (fresh.shape[1],) and from_cache.dtype == torch.bool,
          f"from_cache must be a bool tensor of shape [{fresh.shape[1]}]")  # fmt: skip
    check(fresh.device == cached.device == from_cache.device, "fresh, cached and from_cache on different devices")
    if resolve_backend(backend, fresh.device) == "triton":
        from .deviation_triton import kv_deviation_triton

        return kv_deviation_triton(fresh, cached, from_cache)
    return kv_deviation_torch(fresh, cached, from_cache)


def select_top(deviation: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest finite deviations, sorted ascending. deviation: [T] -> [k] int64."""
    finite = int(torch.isfinite(deviation).sum())
    k = max(0, min(k, finite))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=deviation.device)
    return torch.topk(deviation, k, sorted=False).indices.sort().values
