"""The torch references (what CPU users run) agree with each other and with Hugging Face."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.kernels import attention
from cacheblend_rag.kernels.attention import selected_attention, selected_attention_cpu, selected_attention_torch
from cacheblend_rag.kernels.deviation import kv_deviation, kv_deviation_torch, select_top
from cacheblend_rag.kernels.rotary import RopeTable, apply_rope, apply_rope_torch
from cacheblend_rag.kernels.scatter import scatter_rows


def hf_rotary(rope_parameters: dict | None, head_dim: int = 32):
    """Hugging Face's Llama rotary module for one head_dim, and our table over its frequencies."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    extra = {"rope_parameters": rope_parameters} if rope_parameters else {}
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **extra
    )
    module = LlamaRotaryEmbedding(config)
    return module, RopeTable(module.inv_freq, module.attention_scaling)


ROPES = {
    "default": None,
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
}


# ---- rotary -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_matches_hugging_face_apply_rotary_pos_emb(kind, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    module, rope = hf_rotary(ROPES[kind])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 23, 32, generator=gen).to(dtype)
    k = torch.randn(1, 2, 23, 32, generator=gen).to(dtype)
    positions = torch.randint(0, 3000, (23,), generator=gen)
    cos, sin = module(k, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q[0], positions, rope), q_hf[0])
    assert torch.equal(apply_rope(k[0], positions, rope), k_hf[0])
    assert not torch.equal(k_hf[0], k[0])


def test_rope_at_position_zero_is_the_identity():
    _, rope = hf_rotary(ROPES["llama3"])
    x = torch.randn(3, 9, 32)
    assert torch.equal(apply_rope(x, torch.zeros(9, dtype=torch.long), rope), x)


@pytest.mark.parametrize("kind", ["default", "llama3"])
def test_rope_composes_and_round_trips(kind):
    """rope(rope(x, a), b) == rope(x, a + b): a chunk's keys moved twice land where moved once."""
    _, rope = hf_rotary(ROPES[kind])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 32, generator=gen, dtype=torch.float64).float()
    a = torch.randint(0, 500, (17,), generator=gen)
    b = torch.randint(0, 500, (17,), generator=gen)
    twice = apply_rope(apply_rope(x, a, rope), b, rope)
    assert_close(twice, apply_rope(x, a + b, rope), rtol=1e-4, atol=1e-4)
    # a rotation keeps each pair's length, so it is undone by rotating by the opposite angle
    assert_close(twice.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    angle = (a + b).double()[:, None] * rope.inv_freq.double()[None, :]  # [T, D/2]
    cos, sin = angle.cos(), angle.sin()
    t1, t2 = twice.double()[..., :16], twice.double()[..., 16:]
    back = torch.cat((t1 * cos + t2 * sin, t2 * cos - t1 * sin), dim=-1)
    assert_close(back.float(), x, rtol=1e-4, atol=1e-4)


def test_rope_out_and_in_place_equal_a_new_tensor_and_the_table_grows_consistently():
    _, rope = hf_rotary(ROPES["default"])
    x = torch.randn(9, 2, 32).transpose(0, 1)  # token-major view
    near = torch.arange(9) + 100
    expected_near = apply_rope_torch(x, near, rope)
    far = torch.arange(9) + 10_000  # beyond the first 4096-row table: it is rebuilt larger
    expected_far = apply_rope_torch(x, far, rope)
    assert torch.equal(apply_rope_torch(x, near, rope), expected_near)
    into = torch.empty(2, 9, 32)
    assert apply_rope(x, far, rope, out=into) is into and torch.equal(into, expected_far)
    y = x.clone()
    apply_rope(y, far, rope, out=y)
    assert torch.equal(y, expected_far)
    cos, _ = rope.tables(1, torch.float32, x.device)
    assert cos.shape[0] >= 10_009


# ---- deviation and selection --------------------------------------------------------------------------
def test_deviation_reference_equals_the_formula_in_float64():
    gen = torch.Generator().manual_seed(2)
    fresh = torch.randn(3, 11, 8, generator=gen).to(torch.bfloat16)
    cached = torch.randn(3, 11, 8, generator=gen).to(torch.bfloat16)
    from_cache = torch.rand(11, generator=gen) < 0.5
    got = kv_deviation(fresh, cached, from_cache)
    for t in range(11):
        if from_cache[t]:
            want = sum((float(fresh[h, t, d]) - float(cached[h, t, d])) ** 2 for h in range(3) for d in range(8))
            assert abs(float(got[t]) - want) <= 1e-5 * want
        else:
            assert got[t] == float("-inf")
    rows = torch.tensor([4, 0, 9])
    assert torch.equal(
        kv_deviation(fresh[:, rows], cached, from_cache[rows], rows=rows),
        kv_deviation_torch(fresh[:, rows], cached[:, rows], from_cache[rows]),
    )


def test_select_top_picks_the_largest_finite_deviations_sorted():
    dev = torch.tensor([0.5, float("-inf"), 3.0, 1.0, float("-inf"), 2.0])
    assert select_top(dev, 2).tolist() == [2, 5]
    assert select_top(dev, 10).tolist() == [0, 2, 3, 5]  # never an -inf row
    assert select_top(dev, 0).tolist() == [] and select_top(dev, -3).tolist() == []
    assert select_top(torch.full((3,), float("-inf")), 2).tolist() == []


def test_scatter_rows_writes_only_the_given_rows():
    dst = torch.zeros(2, 7, 4)
    src = torch.randn(2, 3, 4, dtype=torch.float64)
    rows = torch.tensor([5, 0, 3])
    scatter_rows(dst, rows, src)
    assert torch.equal(dst[:, rows], src.float())
    assert dst[:, [1, 2, 4, 6]].abs().sum() == 0
    assert scatter_rows(dst, torch.empty(0, dtype=torch.long), src[:, :0]) is dst


# ---- selected attention -------------------------------------------------------------------------------
def naive_attention(q, q_pos, k, v, scale):
    """Softmax over keys 0..p in float64, one query and head at a time."""
    hq, m, _ = q.shape
    group = hq // k.shape[0]
    out = torch.empty(hq, m, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        for i in range(m):
            p = int(q_pos[i])
            scores = (k[h // group, : p + 1].double() @ q[h, i].double()) * scale
            out[h, i] = torch.softmax(scores, dim=0) @ v[h // group, : p + 1].double()
    return out


def test_attention_reference_equals_the_definition():
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(6, 5, 8, generator=gen), torch.randn(2, 13, 8, generator=gen), torch.randn(2, 13, 8)
    q_pos = torch.tensor([12, 0, 7, 3, 7])
    assert_close(
        selected_attention_torch(q, q_pos, k, v, 0.3).double(),
        naive_attention(q, q_pos, k, v, 0.3),
        rtol=1e-5,
        atol=1e-5,
    )


def cases(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    sub = torch.randperm(n, generator=gen)[: n // 3].sort().values
    return {
        "prefill": torch.arange(n),  # fused causal kernel
        "decode": torch.tensor([n - 1]),  # no mask
        "decode_many": torch.full((3,), n - 1),
        "first": torch.tensor([0]),
        "sorted_subset": sub,
        "unsorted_subset": sub[torch.randperm(sub.numel(), generator=gen)],
        "suffix": torch.arange(n // 2, n),  # what prefix_cache computes
        # what a blend computes: the head, scattered chunk rows, the question's contiguous run at the end
        "blend": torch.cat([torch.arange(5), sub[(sub >= 5) & (sub < n - 40)], torch.arange(n - 40, n)]),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (6, 2)])
@pytest.mark.parametrize(
    "which", ["prefill", "decode", "decode_many", "first", "sorted_subset", "unsorted_subset", "suffix", "blend"]
)
def test_cpu_path_equals_reference(dtype, q_heads, kv_heads, which):
    gen = torch.Generator().manual_seed(q_heads)
    n = 700  # enough queries for several of the CPU path's query blocks
    q_pos = cases(n, gen)[which]
    q = torch.randn(q_pos.numel(), q_heads, 16, generator=gen).to(dtype).transpose(0, 1)
    k = torch.randn(kv_heads, n, 16, generator=gen).to(dtype)
    v = torch.randn(n, kv_heads, 16, generator=gen).to(dtype).transpose(0, 1)
    expected = selected_attention_torch(q, q_pos, k, v, 0.25)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype)
    tol = {"rtol": tol, "atol": tol} if tol else {"rtol": 1.6e-2, "atol": 1e-2}
    assert_close(selected_attention_cpu(q, q_pos, k, v, 0.25), expected, **tol)
    assert_close(selected_attention(q, q_pos, k, v, 0.25), expected, **tol)  # the CPU wrapper's choice


def test_cpu_path_block_cache_is_keyed_on_positions_and_length(monkeypatch):
    """The next layer reuses the previous call's masks; a new length or new positions must not."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    gen = torch.Generator().manual_seed(4)
    q_pos = torch.tensor([2, 5, 9, 10, 20, 21, 30, 33, 34, 39, 40, 41, 45, 47, 48, 49, 50, 55])
    q = torch.randn(2, q_pos.numel(), 8, generator=gen)
    for n in (56, 56, 60):
        k, v = torch.randn(2, n, 8, generator=gen), torch.randn(2, n, 8, generator=gen)
        assert_close(selected_attention_cpu(q, q_pos, k, v, 0.5), selected_attention_torch(q, q_pos, k, v, 0.5))
    other = q_pos - 2
    assert_close(selected_attention_cpu(q, other, k, v, 0.5), selected_attention_torch(q, other, k, v, 0.5))


def test_empty_selection():
    q = torch.randn(4, 0, 8)
    k = torch.randn(2, 5, 8)
    for fn in (selected_attention_torch, selected_attention):
        assert fn(q, torch.empty(0, dtype=torch.long), k, k, 0.5).shape == (4, 0, 8)
