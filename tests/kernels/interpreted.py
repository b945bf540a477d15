"""Triton kernels against their torch references, run by Triton's interpreter on CPU tensors.

Not collected by the normal run (the name does not start with ``test_``): ``test_triton_interpreted.py``
runs this module in a subprocess with ``TRITON_INTERPRET=1``, which must be set before the kernels are
defined. Shapes are small and awkward (odd token counts, head_dim that is not a power of two, GQA groups
of 1, 3 and 8, strided views) because the interpreter is slow and the edges are where kernels break.
Test names start with the kernel's name: the parent test reports each kernel separately.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guards against a wrong invocation
    raise RuntimeError(
        "tests/kernels/interpreted.py needs TRITON_INTERPRET=1 set before Python starts; run it through "
        "tests/kernels/test_triton_interpreted.py"
    )

from cacheblend_rag.kernels import attention, deviation, rotary
from cacheblend_rag.kernels.attention import selected_attention, selected_attention_torch
from cacheblend_rag.kernels.deviation import kv_deviation, kv_deviation_torch
from cacheblend_rag.kernels.rotary import RopeTable, apply_rope, apply_rope_torch

DTYPES = [torch.float32, torch.bfloat16]


def strided(shape: tuple[int, int, int], dtype: torch.dtype, gen: torch.Generator, layout: str) -> torch.Tensor:
    """A [H, T, D] tensor that is contiguous, token-major (a transposed view) or a slice with gaps."""
    h, t, d = shape
    if layout == "contiguous":
        return torch.randn(h, t, d, generator=gen).to(dtype)
    if layout == "token_major":  # what the engine's projections give: view(T, H, D).transpose(0, 1)
        return torch.randn(t, h, d, generator=gen).to(dtype).transpose(0, 1)
    # every other token of a larger buffer, with padding after head_dim
    return torch.randn(h, 2 * t, d + 3, generator=gen).to(dtype)[:, ::2, :d]


def llama3_rope(head_dim: int) -> RopeTable:
    """Llama 3 scaled frequencies and a non-unit attention scaling, as Hugging Face computes them."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_parameters=params)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return RopeTable(inv_freq, attention_scaling=1.25)


def default_rope(head_dim: int) -> RopeTable:
    return RopeTable(1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)))


# ---- rotary -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "token_major", "gapped"])
@pytest.mark.parametrize(("heads", "tokens", "head_dim"), [(1, 1, 16), (3, 37, 48), (2, 70, 64)])
def test_rope_equals_reference_bitwise(dtype, layout, heads, tokens, head_dim):
    gen = torch.Generator().manual_seed(heads * 100 + tokens)
    rope = llama3_rope(head_dim) if head_dim == 64 else default_rope(head_dim)
    x = strided((heads, tokens, head_dim), dtype, gen, layout)
    # positions not starting at 0, unsorted, some beyond the table's first 4096 rows
    positions = torch.randint(0, 9000, (tokens,), generator=gen) + 5
    expected = apply_rope_torch(x, positions, rope)
    out = apply_rope(x, positions, rope, backend="triton")
    assert torch.equal(out, expected)
    into = torch.full_like(expected, float("nan"))
    assert apply_rope(x, positions, rope, out=into, backend="triton") is into
    assert torch.equal(into, expected)
    inplace = x.clone() if layout == "contiguous" else x  # in place on a strided view of a larger buffer
    before = inplace.clone()
    apply_rope(inplace, positions, rope, out=inplace, backend="triton")
    assert torch.equal(inplace, expected)
    assert not torch.equal(inplace, before) or tokens == 1


def test_rope_in_place_on_a_cache_layer_view_leaves_other_rows_alone():
    gen = torch.Generator().manual_seed(1)
    rope = llama3_rope(32)
    cache = torch.randn(2, 3, 50, 32, generator=gen).to(torch.bfloat16)  # [L, Hkv, capacity, D]
    untouched = cache.clone()
    keys = cache[1, :, :41]  # the engine rotates cache.layer(1, n) in place
    positions = torch.arange(41)
    expected = apply_rope_torch(keys, positions, rope)
    apply_rope(keys, positions, rope, out=keys, backend="triton")
    assert torch.equal(cache[1, :, :41], expected)
    assert torch.equal(cache[1, :, 41:], untouched[1, :, 41:])
    assert torch.equal(cache[0], untouched[0])


def test_strided_index_tensors_are_read_by_their_strides():
    """positions, q_pos, from_cache and rows given as views with a stride of 2."""
    gen = torch.Generator().manual_seed(9)
    rope = default_rope(16)
    x = torch.randn(2, 7, 16, generator=gen)
    positions = (torch.arange(14) * 3)[::2]
    assert torch.equal(apply_rope(x, positions, rope, backend="triton"), apply_rope_torch(x, positions, rope))
    from_cache = torch.tensor([True, False] * 7)[::2].logical_xor(torch.tensor([0, 1, 0, 0, 1, 0, 1], dtype=torch.bool))
    big = torch.randn(2, 30, 16, generator=gen)
    rows = torch.arange(0, 28, 2)[::2]  # 0, 4, ..., 24
    got = kv_deviation(x, big, from_cache, rows=rows, backend="triton")
    assert_close(got, kv_deviation_torch(x, big[:, rows], from_cache), rtol=1e-5, atol=1e-5)
    q_pos = torch.tensor([3, 0, 5, 0, 9, 0, 19, 0])[::2]
    q = torch.randn(4, 4, 16, generator=gen)
    got = selected_attention(q, q_pos, big, big, 0.25, backend="triton")
    assert_close(got, selected_attention_torch(q, q_pos, big, big, 0.25), rtol=1e-5, atol=1e-5)


def test_rope_empty_and_int32_positions():
    rope = default_rope(16)
    empty = torch.empty(2, 0, 16)
    assert apply_rope(empty, torch.empty(0, dtype=torch.long), rope, backend="triton").shape == (2, 0, 16)
    x = torch.randn(2, 5, 16)
    pos32 = torch.tensor([7, 3, 0, 12, 4000], dtype=torch.int32)
    assert torch.equal(apply_rope(x, pos32, rope, backend="triton"), apply_rope_torch(x, pos32.long(), rope))


# ---- deviation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "token_major", "gapped"])
@pytest.mark.parametrize(("heads", "tokens", "head_dim"), [(1, 1, 16), (3, 37, 40), (2, 70, 160)])
@pytest.mark.parametrize("mask", ["random", "all", "none"])
def test_deviation_equals_reference(dtype, layout, heads, tokens, head_dim, mask):
    gen = torch.Generator().manual_seed(tokens + head_dim)
    fresh = strided((heads, tokens, head_dim), dtype, gen, layout)
    cached = strided((heads, tokens, head_dim), dtype, gen, "contiguous")
    from_cache = {
        "random": torch.rand(tokens, generator=gen) < 0.6,
        "all": torch.ones(tokens, dtype=torch.bool),
        "none": torch.zeros(tokens, dtype=torch.bool),
    }[mask]
    expected = kv_deviation_torch(fresh, cached, from_cache)
    got = kv_deviation(fresh, cached, from_cache, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (tokens,)
    assert torch.equal(torch.isneginf(got), ~from_cache)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deviation_with_rows_reads_the_fused_cache_in_place(dtype):
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(2, 61, 24, generator=gen).to(dtype)  # [Hkv, N, D]
    rows = torch.tensor([0, 5, 6, 17, 30, 31, 59, 60])
    fresh = strided((2, rows.numel(), 24), dtype, gen, "token_major")
    from_cache = torch.tensor([True, True, False, True, True, True, False, True])
    expected = kv_deviation_torch(fresh, fused[:, rows], from_cache)
    got = kv_deviation(fresh, fused, from_cache, rows=rows, backend="triton")
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(got), ~from_cache)


def test_deviation_empty():
    empty = torch.empty(2, 0, 16)
    got = kv_deviation(empty, empty, torch.empty(0, dtype=torch.bool), backend="triton")
    assert got.shape == (0,) and got.dtype == torch.float32


# ---- selected attention -------------------------------------------------------------------------------
N_KEYS = 45


def selections(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    sub = torch.randperm(n - 4, generator=gen)[: n // 4].sort().values + 4
    return {
        "empty": torch.empty(0, dtype=torch.long),
        "first": torch.tensor([0]),
        "middle": torch.tensor([n // 2]),
        "last": torch.tensor([n - 1]),
        "all": torch.arange(n),
        "subset": sub,  # sorted, not starting at 0, as the engine passes them
        "unsorted": sub[torch.randperm(sub.numel(), generator=gen)],
        "late": torch.arange(n - 7, n),  # every query past the first key blocks: unmasked loop runs
    }


def reference(q, q_pos, k, v, scale):
    """The torch reference in float32 on the same (possibly 16-bit) inputs."""
    return selected_attention_torch(q.float(), q_pos, k.float(), v.float(), scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(3, 3), (6, 2), (8, 1)])
@pytest.mark.parametrize("which", ["empty", "first", "middle", "last", "all", "subset", "unsorted", "late"])
def test_attention_equals_reference(dtype, q_heads, kv_heads, which):
    gen = torch.Generator().manual_seed(q_heads * 10 + kv_heads)
    head_dim = 24  # not a power of two: the kernel pads to 32 and masks
    q_pos = selections(N_KEYS, gen)[which]
    m = q_pos.numel()
    q = strided((q_heads, m, head_dim), dtype, gen, "token_major")  # as project_q returns it
    cache = torch.randn(2, kv_heads, N_KEYS + 9, head_dim, generator=gen).to(dtype)  # [L, Hkv, capacity, D]
    k, v = cache[0, :, :N_KEYS], cache[1, :, :N_KEYS]  # layer views of a cache with spare capacity
    scale = head_dim**-0.5
    got = selected_attention(q, q_pos, k, v, scale, backend="triton")
    assert got.shape == (q_heads, m, head_dim) and got.dtype == dtype
    expected = reference(q, q_pos, k, v, scale)
    if dtype == torch.float32:
        assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        # bf16 output (and bf16 attention weights in P @ V): within a few bf16 steps of the float32 result,
        # and no further from it than twice the bf16 torch reference's own error (plus one bf16 step)
        assert_close(got.float(), expected, rtol=1.6e-2, atol=2e-2)
        if m:
            torch_err = (selected_attention_torch(q, q_pos, k, v, scale).float() - expected).abs().max()
            assert (got.float() - expected).abs().max() <= 2 * torch_err + 2**-8


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 32), (32, 16), (64, 64)])
def test_attention_block_sizes(block_m, block_n):
    """Other tilings (as the GPU uses) give the same result: packing, skipping and masking are tile-exact."""
    gen = torch.Generator().manual_seed(block_m + block_n)
    q_heads, kv_heads, n, head_dim = 12, 4, 83, 16
    q_pos = torch.cat([torch.tensor([2, 3]), torch.randperm(n - 40, generator=gen)[:17].sort().values + 40])
    q = torch.randn(q_heads, q_pos.numel(), head_dim, generator=gen)
    k = torch.randn(kv_heads, n, head_dim, generator=gen)
    v = torch.randn(kv_heads, n, head_dim, generator=gen)
    got = attention.selected_attention_triton(q, q_pos, k, v, 0.3, block_m=block_m, block_n=block_n)
    assert_close(got, selected_attention_torch(q, q_pos, k, v, 0.3), rtol=1e-5, atol=1e-5)


def test_attention_extreme_scores_stay_finite():
    """Large logits: the running max keeps exp2 in range, as SDPA does."""
    gen = torch.Generator().manual_seed(5)
    q = 30 * torch.randn(4, 9, 16, generator=gen)
    k = 30 * torch.randn(2, 40, 16, generator=gen)
    v = torch.randn(2, 40, 16, generator=gen)
    q_pos = torch.tensor([0, 1, 7, 15, 16, 17, 31, 38, 39])
    got = selected_attention(q, q_pos, k, v, 0.25, backend="triton")
    assert torch.isfinite(got).all()
    assert_close(got, selected_attention_torch(q, q_pos, k, v, 0.25), rtol=1e-4, atol=1e-4)


def test_all_three_kernels_really_ran_under_the_interpreter(monkeypatch):
    """The equalities above prove nothing if the wrappers silently took the torch path."""
    calls = []
    for module, name in (
        (rotary, "apply_rope_triton"),
        (deviation, "kv_deviation_triton"),
        (attention, "selected_attention_triton"),
    ):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    x = torch.randn(2, 5, 16)
    rotary.apply_rope(x, torch.arange(5), default_rope(16), backend="triton")
    deviation.kv_deviation(x, x, torch.ones(5, dtype=torch.bool), backend="triton")
    attention.selected_attention(x, torch.arange(5), x, x, 0.25, backend="triton")
    assert calls == ["apply_rope_triton", "kv_deviation_triton", "selected_attention_triton"]


# ---- the engine's blended prefill ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    path = os.environ.get("CACHEBLEND_TEST_TOKENIZER")
    if not path:
        pytest.skip("CACHEBLEND_TEST_TOKENIZER (the SmolLM2 folder) not given by the parent test")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def engines(tokenizer, tmp_path, arch):
    """Two engines over the same tiny 3-layer model: default backend triton and torch."""
    from cacheblend_rag import BlendConfig, CacheBlendEngine
    from tests.conftest import tiny_model

    model = tiny_model(arch, seed=11, layers=3)
    return [
        CacheBlendEngine(
            model,
            tokenizer,
            store=["memory://?max_bytes=256MB"],
            store_dtype=torch.float32,
            cache_dir=tmp_path / backend,
            config=BlendConfig(backend=backend),
        )
        for backend in ("triton", "torch")
    ]


@pytest.mark.parametrize("arch", ["llama", "llama3_rope"])
def test_engine_blended_prefill_triton_equals_torch(tokenizer, tmp_path, arch):
    from cacheblend_rag import BlendConfig
    from tests.conftest import MESSI, RONALDO  # two short chunks: the interpreter is slow

    triton_engine, torch_engine = engines(tokenizer, tmp_path, arch)
    # chunk precompute (a full prefill with capture) through the kernels stores the same KV
    handles = triton_engine.precompute([MESSI, RONALDO])
    torch_handles = torch_engine.precompute([MESSI, RONALDO])
    for h, th in zip(handles, torch_handles):
        kv, _ = triton_engine.chunk_kv(h)
        torch_kv, _ = torch_engine.chunk_kv(th)
        assert_close(kv.k, torch_kv.k, rtol=1e-5, atol=1e-5)
        assert_close(kv.v, torch_kv.v, rtol=1e-5, atol=1e-5)
    segments = ["Read:\n", *handles, "\nWho scored?"]
    for cfg in (
        BlendConfig(strategy="cacheblend", recompute_ratio=0.3),
        BlendConfig(selection="deviation", recompute_ratio=0.15, check_layers=(1, 2), deviation="k"),
        BlendConfig(strategy="full_recompute"),
    ):
        got = triton_engine.prepare(segments, config=cfg.replace(backend="triton"))
        expected = torch_engine.prepare(segments, config=cfg.replace(backend="torch"))
        assert got.stats.layer_rows == expected.stats.layer_rows
        assert 0 < got.stats.recomputed_tokens <= got.stats.prompt_tokens
        assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    # decoding on the fused cache runs the rotation and attention kernels one token at a time
    blend = BlendConfig(strategy="cacheblend", recompute_ratio=0.3)
    got = triton_engine.generate(segments, max_new_tokens=4, config=blend.replace(backend="triton"))
    expected = torch_engine.generate(segments, max_new_tokens=4, config=blend.replace(backend="torch"))
    assert got.token_ids == expected.token_ids


DECODE_SHAPES = [(4, 2, 32, 70, 0), (6, 2, 24, 70, 41), (8, 1, 16, 300, 299), (3, 3, 8, 33, 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,n,pos", DECODE_SHAPES)
def test_decode_attention_equals_reference(dtype, hq, hkv, d, n, pos):
    """One decoding query over keys 0..pos (rows after pos hold garbage that must not count), split over keys."""
    from cacheblend_rag.kernels.decode_attention import decode_attention, decode_attention_torch

    gen = torch.Generator().manual_seed(pos + n)
    q = torch.randn(hq, 1, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n, d, generator=gen).to(dtype)
    k[:, pos + 1 :] = 1e4  # never read
    p = torch.tensor([pos])
    ref = decode_attention_torch(q.float(), p, k.float(), v.float(), d**-0.5)
    out = decode_attention(q, p, k, v, d**-0.5, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == (hq, 1, d) and out.dtype == dtype
    assert_close(out.float(), ref, atol=tol, rtol=tol)
    masked = decode_attention_torch(q, p, k, v, d**-0.5)  # the torch path with the mask equals the one with length
    assert_close(masked, decode_attention_torch(q, p, k, v, d**-0.5, length=pos + 1), atol=tol, rtol=tol)


BATCH_DECODE_CASES = [(4, 2, 32, 70, [0, 41, 69]), (6, 2, 24, 40, [17]), (3, 3, 8, 33, [5, 32, 0, 9])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,n,positions", BATCH_DECODE_CASES)
@pytest.mark.parametrize("known_length", [True, False])
def test_batch_decode_attention_equals_reference(dtype, hq, hkv, d, n, positions, known_length):
    """One query per sequence over its own keys 0..pos[b], the sequences strided views of a slot pool (rows past a
    sequence's position hold values that must not count), split over keys; with and without the host's length."""
    from cacheblend_rag.kernels.batch_decode import batch_decode_attention, batch_decode_attention_torch

    gen = torch.Generator().manual_seed(n + len(positions))
    b = len(positions)
    pool_k = torch.randn(b + 1, 2, hkv, n, d, generator=gen).to(dtype)
    pool_v = torch.randn(b + 1, 2, hkv, n, d, generator=gen).to(dtype)
    for i, p in enumerate(positions):
        pool_k[i, 1, :, p + 1 :] = 1e4
    k, v = pool_k[:b, 1], pool_v[:b, 1]
    q = torch.randn(b, hq, d, generator=gen).to(dtype).transpose(0, 1)
    pos = torch.tensor(positions)
    length = max(positions) + 1 if known_length else None
    ref = batch_decode_attention_torch(q.float(), pos, k.float(), v.float(), d**-0.5, length=length)
    out = batch_decode_attention(q, pos, k, v, d**-0.5, length=length, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == (hq, b, d) and out.dtype == dtype
    assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_engine_batched_decoding_triton_equals_torch(tokenizer, tmp_path):
    """A RunningBatch on the Triton kernels (rotation and batched decoding attention) picks the tokens it picks on
    the torch references, sequences of different lengths joining between steps."""
    from cacheblend_rag import SamplingParams
    from cacheblend_rag.engine.running_batch import RunningBatch
    from cacheblend_rag.engine.sampling import Sampler
    from cacheblend_rag.engine.text_stream import TextStreamer
    from tests.conftest import MESSI, RONALDO

    engine = engines(tokenizer, tmp_path, "llama")[1]
    prompts = [[MESSI, "\nWho?"], ["Hi"], [RONALDO]]
    outcomes = []
    for backend in ("triton", "torch"):
        batch = RunningBatch(engine.model_forward.with_backend(backend), slots=4, capacity=64)
        seqs = []
        for prompt in prompts:
            request = engine.prepare(prompt)
            sampling = SamplingParams(max_new_tokens=5)
            seqs.append(
                batch.add(
                    request.cache,
                    request.logits,
                    Sampler(sampling),
                    TextStreamer(tokenizer, ()),
                    5,
                    frozenset(),
                )
            )
            batch.step()
        while len(batch):
            batch.step()
        outcomes.append([seq.tokens for seq in seqs])
    assert outcomes[0] == outcomes[1]
