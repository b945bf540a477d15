"""The batched decoding attention's torch reference (kernels/batch_decode.py, what CPU runs) equals the one-query
reference (kernels/decode_attention.py) for every sequence of the batch, over strided views of a slot pool."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.kernels.batch_decode import batch_decode_attention, batch_decode_attention_torch
from cacheblend_rag.kernels.decode_attention import decode_attention_torch


def pool_batch(hq: int, hkv: int, d: int, n: int, positions: list[int], dtype: torch.dtype):
    """q: [Hq, B, D]; k, v: [B, Hkv, N, D] as views of a [slots, L, Hkv, N, D] pool (layer 1 of slots 0..B-1),
    rows past each position filled with large finite values that must not count."""
    gen = torch.Generator().manual_seed(n + len(positions))
    b = len(positions)
    pool_k = torch.randn(b + 1, 3, hkv, n, d, generator=gen).to(dtype)
    pool_v = torch.randn(b + 1, 3, hkv, n, d, generator=gen).to(dtype)
    for i, p in enumerate(positions):
        pool_k[i, 1, :, p + 1 :] = 1e4
        pool_v[i, 1, :, p + 1 :] = -1e4
    q = torch.randn(b, hq, d, generator=gen).to(dtype).transpose(0, 1)  # token-major, as the projections give
    return q, torch.tensor(positions), pool_k[:b, 1], pool_v[:b, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (9, 3), (6, 6)])
@pytest.mark.parametrize("positions", [[0], [5], [7, 0, 33, 12], [40, 40, 2]])
def test_each_sequence_attends_to_its_own_keys_up_to_its_position(dtype, hq, hkv, positions):
    d, n = 16, 48
    q, pos, k, v = pool_batch(hq, hkv, d, n, positions, dtype)
    scale = d**-0.5
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for length in (max(positions) + 1, None):
        out = batch_decode_attention_torch(q, pos, k, v, scale, length=length)
        assert out.shape == (hq, len(positions), d) and out.dtype == dtype
        for b, p in enumerate(positions):
            alone = decode_attention_torch(q[:, b : b + 1], pos[b : b + 1], k[b], v[b], scale, length=p + 1)
            assert_close(out[:, b : b + 1], alone, atol=tol, rtol=tol)


def test_one_sequence_cut_at_its_length_is_the_one_query_reference_exactly():
    q, pos, k, v = pool_batch(4, 2, 16, 48, [21], torch.float32)
    out = batch_decode_attention(q, pos, k, v, 0.25, length=22, backend="torch")
    assert torch.equal(out, decode_attention_torch(q, pos, k[0], v[0], 0.25, length=22))


def test_the_wrapper_names_a_wrong_shape():
    q, pos, k, v = pool_batch(4, 2, 16, 48, [3, 4], torch.float32)
    with pytest.raises(ValueError, match="2 queries but 1 sequences"):
        batch_decode_attention(q, pos, k[:1], v[:1], 0.25)
    with pytest.raises(ValueError, match="pos must be a \\[2\\] int64"):
        batch_decode_attention(q, pos[:1], k, v, 0.25)
    with pytest.raises(ValueError, match="length must lie in"):
        batch_decode_attention(q, pos, k, v, 0.25, length=49)
