"""Batched precompute: the KV of many chunks from one forward pass (varlen: the chunks' rows are concatenated).

Each chunk is computed after the chunk prefix and its own context (none, or the texts it is stored after), at
positions 0..len-1 (``chunk_source.py``). Here the sequences ``prefix + context + chunk`` of a batch are laid end
to end as one [S] row set: the row-wise work (norms, projections, the MLP: almost all of the FLOPs) runs as one
matrix product per weight over all S rows, and attention runs per sequence on its own rows (a block-diagonal
causal mask, written as one attention call per sequence, so a chunk never sees another). The numbers are those of
computing each chunk after its context alone, up to the matmul's summation order
(``tests/engine/test_batch_compute.py``).
Index tensors are built on the host and uploaded once; nothing in the layer loop reads the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.forward import ModelForward
from ..store.chunk import ChunkKV
from .transfer import upload

GPU_BATCH_TOKENS = 16_384  # rows per forward on CUDA (an 8B model's activations stay a few GB)


def default_batch_tokens(device: torch.device) -> int:
    """Rows per precompute forward: GPU_BATCH_TOKENS on CUDA; 0 (one chunk per forward, as before) elsewhere, where
    batching buys little and one-by-one keeps the CPU results exactly what they were."""
    return GPU_BATCH_TOKENS if device.type == "cuda" else 0


def batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of indices into ``lengths`` whose lengths sum to at most ``max_tokens`` (a longer one
    alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, length in enumerate(lengths):
        if groups and total + length <= max_tokens:
            groups[-1].append(i)
            total += length
        else:
            groups.append([i])
            total = length
    return groups


def compute_batch(
    fwd: ModelForward,
    prefix_ids: Sequence[int],
    chunks: Sequence[Sequence[int]],
    contexts: Sequence[Sequence[int]] | None = None,
) -> list[ChunkKV]:
    """The stored KV of every chunk in ``chunks`` (token ids), each computed after ``prefix_ids`` and its own
    ``contexts[i]`` (token ids; none by default) at positions 0..len-1, prefix and context rows dropped, keys
    before RoPE: one ChunkKV [L, Hkv, T_i, D] per chunk."""
    contexts = contexts if contexts is not None else [()] * len(chunks)
    if len(contexts) != len(chunks):
        raise ValueError(f"{len(contexts)} contexts for {len(chunks)} chunks; give one per chunk")
    seqs = [[*prefix_ids, *ctx, *c] for ctx, c in zip(contexts, chunks)]
    leads = [len(prefix_ids) + len(ctx) for ctx in contexts]  # the rows before each chunk's own
    lengths = [len(s) for s in seqs]
    offsets = [sum(lengths[:i]) for i in range(len(seqs))]
    device = fwd.device
    ids = upload(torch.tensor([t for s in seqs for t in s], dtype=torch.long), device)  # [S]
    positions = upload(torch.cat([torch.arange(n) for n in lengths]), device)  # [S]: each sequence from 0
    local = [positions[o : o + n] for o, n in zip(offsets, lengths)]  # [n_i] = 0..n_i-1 (views, no copy)
    fwd = fwd.within(max(lengths))
    h = fwd.embed(ids)  # [S, hidden]
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for layer in range(fwd.n_layers):
        x = fwd.attn_input(layer, h)  # [S, hidden]
        k, v = fwd.project_kv(layer, x)  # [Hkv, S, D] each, k before RoPE
        ks.append(k)
        vs.append(v)
        if layer == fwd.n_layers - 1:  # the last layer's K/V are all a chunk keeps
            break
        q = fwd.project_q(layer, x, positions)  # [Hq, S, D] rotated
        k_rot = fwd.rotate(k, positions)  # [Hkv, S, D]
        attn = torch.empty_like(q)
        for o, n, pos in zip(offsets, lengths, local):
            attn[:, o : o + n] = fwd.attend(q[:, o : o + n], pos, k_rot[:, o : o + n], v[:, o : o + n])
        h = fwd.finish_layer(layer, h, attn)  # [S, hidden]
    out = []
    for o, n, lead in zip(offsets, lengths, leads):
        rows = slice(o + lead, o + n)
        out.append(ChunkKV(torch.stack([k[:, rows] for k in ks]), torch.stack([v[:, rows] for v in vs])))
    return out
