"""Decoding after the prefill: one token at a time on the fused cache.

``decode_step`` runs one token eagerly. Nothing in it reads the device: the token and its position are written
into device tensors by fill kernels, not copied from the host, and the attention
(``kernels/decode_attention.py``) takes the position as a tensor. On CUDA, ``Decoder`` captures that step once per
request in a CUDA graph and replays it for every later token (the host then launches one graph instead of a few
hundred kernels per token); if capture fails it says so once and decodes eagerly.
"""

from __future__ import annotations

import logging

import torch

from ..model.forward import ModelForward
from .kv_cache import KVCache

logger = logging.getLogger(__name__)

GRAPH_MIN_TOKENS = 8  # decodes shorter than this stay eager: capturing costs about two eager steps


def decode_step(fwd: ModelForward, cache: KVCache, token: int) -> torch.Tensor:
    """Append ``token`` at position ``cache.length``; return the next-token logits [vocab] (float32)."""
    pos = cache.length
    if pos >= cache.capacity:
        raise RuntimeError(f"KV cache full at {pos} tokens")
    device = cache.k.device
    positions = torch.full((1,), pos, dtype=torch.long, device=device)
    tokens = torch.full((1,), token, dtype=torch.long, device=device)
    logits = step(fwd, cache, tokens, positions, length=pos + 1)
    cache.length = pos + 1
    return logits


def step(
    fwd: ModelForward, cache: KVCache, token: torch.Tensor, pos: torch.Tensor, length: int | None = None
) -> torch.Tensor:
    """One decoding step on device tensors (what a CUDA graph captures): token, pos: [1] int64; the token's K/V go
    to row ``pos`` of ``cache``; its query attends to rows 0..pos. ``length`` (pos + 1, when the host knows it)
    lets the torch attention skip its mask. -> logits [vocab] float32."""
    fwd = fwd.within(cache.capacity)  # pos < capacity: nothing read back
    h = fwd.embed(token)  # [1, hidden]
    for layer in range(fwd.n_layers):
        q, k, v = fwd.qkv(layer, h, pos)  # q: [Hq, 1, D] rotated; k, v: [Hkv, 1, D], k before RoPE
        keys, values = cache.k[layer], cache.v[layer]  # [Hkv, capacity, D]
        keys.index_copy_(1, pos, fwd.rotate(k, pos))
        values.index_copy_(1, pos, v)
        attn = fwd.kernels.decode_attention(q, pos, keys, values, fwd.scale, length=length)
        h = fwd.finish_layer(layer, h, attn)
    return fwd.logits(h)[0]


class Decoder:
    """Decodes one request after its prefill: ``decoder(token)`` appends ``token`` and returns the next logits.

    graphs: on CUDA, capture one step in a CUDA graph on the first call and replay it for every token after
    (``tokens`` left to decode must be at least GRAPH_MIN_TOKENS); anywhere else, or if capture fails (logged
    once per engine through ``on_graph_failure``), every step runs eagerly. The graph's logits tensor is reused:
    read it before the next call (the sampler does).
    """

    def __init__(self, fwd: ModelForward, cache: KVCache, graphs: bool = False, on_graph_failure=None) -> None:
        self.fwd = fwd
        self.cache = cache
        self.use_graph = graphs and cache.k.device.type == "cuda"
        self.on_graph_failure = on_graph_failure
        self.graph = None
        self.graph_steps = 0

    def __call__(self, token: int) -> torch.Tensor:
        if self.use_graph and self.graph is None:
            self._capture(token)
        if self.graph is None:
            return decode_step(self.fwd, self.cache, token)
        pos = self.cache.length
        if pos >= self.cache.capacity:
            raise RuntimeError(f"KV cache full at {pos} tokens")
        self._token.fill_(token)  # fill kernels with the values as arguments: no host-to-device copy
        self._pos.fill_(pos)
        self.graph.replay()
        self.cache.length = pos + 1
        self.graph_steps += 1
        return self._logits

    def _capture(self, token: int) -> None:
        """Capture ``step`` over this request's cache. The warm-up runs the real step for ``token`` (its writes are
        the ones the replay repeats), on the capture stream, so cuBLAS and Triton are ready before capture."""
        self.use_graph = False  # one attempt per request
        cache, fwd = self.cache, self.fwd
        device = cache.k.device
        pos = cache.length
        if pos >= cache.capacity:
            return
        try:
            # built here, on the main stream, not in the graph; and held: the graph reads these tensors at every
            # replay, and a longer request growing the shared table would otherwise free them under it
            self._rope_tables = fwd.rope.tables(cache.capacity, cache.k.dtype, device)
            # rows past the prompt are never read (attention stops at pos), but keep them finite all the same
            cache.k[:, :, pos:].zero_()
            cache.v[:, :, pos:].zero_()
            self._token = torch.full((1,), token, dtype=torch.long, device=device)
            self._pos = torch.full((1,), pos, dtype=torch.long, device=device)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                step(fwd, cache, self._token, self._pos)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self._logits = step(fwd, cache, self._token, self._pos)
            self.graph = graph
        except Exception as exc:  # an eager step is always correct: fall back to it
            self.graph = None
            if self.on_graph_failure is not None:
                self.on_graph_failure(exc)
            else:
                logger.warning("CUDA graph capture failed (%s); decoding eagerly", exc)
