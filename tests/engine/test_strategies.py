"""The correctness anchors of DESIGN.md: every strategy against full recompute."""

import pytest
import torch
from torch.testing import assert_close

from tests.conftest import MESSI, PASSAGES, RONALDO, config

QUESTION = "\nQuestion: which river reaches the Black Sea?"


def greedy(engine, segments, cfg, n=8):
    return engine.generate(segments, max_new_tokens=n, config=cfg).token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3_rope"])
def test_cacheblend_ratio_one_equals_full_recompute(arch, make_engine):
    engine = make_engine(arch, seed=7, store_dtype=torch.float16)
    handles = engine.precompute(PASSAGES)
    segments = ["Read the passages.\n", *handles, QUESTION]
    full = engine.prepare(segments, config=config("full_recompute"))
    blended = engine.prepare(segments, config=config("cacheblend", recompute_ratio=1.0))
    assert blended.stats.recomputed_tokens == blended.stats.prompt_tokens
    assert_close(blended.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert greedy(engine, segments, config("cacheblend", recompute_ratio=1.0)) == greedy(
        engine, segments, config("full_recompute")
    )


def test_gradual_filtering_and_k_deviation_at_ratio_one_equal_full_recompute(make_engine):
    engine = make_engine("llama", seed=2)
    segments = ["Read.\n", *engine.precompute(PASSAGES), QUESTION]
    full = engine.prepare(segments, config=config("full_recompute")).logits
    for cfg in (
        config("cacheblend", selection="deviation", recompute_ratio=1.0, check_layers=(1, 2, 3)),
        config("cacheblend", selection="deviation", recompute_ratio=1.0, deviation="k"),
    ):
        assert_close(engine.prepare(segments, config=cfg).logits, full, atol=1e-5, rtol=1e-5)


def test_prefix_cache_equals_full_recompute(make_engine):
    engine = make_engine("qwen2", seed=4)
    handles = engine.precompute(PASSAGES)
    segments = ["System: answer briefly.\n", *handles, QUESTION]
    full = engine.prepare(segments, config=config("full_recompute"))
    first = engine.prepare(segments, config=config("prefix_cache"))
    assert first.stats.reused_tokens == 0 and first.stats.cache_misses == 1
    second = engine.prepare(segments, config=config("prefix_cache"))
    # every block but the last (the question) comes from the prefix cache the first request filled
    assert second.stats.reused_tokens == second.stats.prompt_tokens - len(engine.tokenize(QUESTION))
    assert_close(first.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert_close(second.logits, full.logits, atol=1e-5, rtol=1e-5)
    # a different continuation after the same prefix reuses the shared part only
    other = engine.prepare([segments[0], handles[0], handles[2], QUESTION], config=config("prefix_cache"))
    assert other.stats.reused_tokens == len(engine.tokenize(segments[0])) + handles[0].n_tokens
    reference = engine.prepare([segments[0], handles[0], handles[2], QUESTION], config=config("full_recompute"))
    assert_close(other.logits, reference.logits, atol=1e-5, rtol=1e-5)


def test_one_chunk_right_after_the_prefix_under_full_reuse_equals_full_recompute(make_engine, tokenizer):
    engine = make_engine("llama", seed=8)
    prefix_text = tokenizer.decode(engine.chunk_prefix_ids)
    assert engine.tokenize(prefix_text) == engine.chunk_prefix_ids
    (handle,) = engine.precompute([PASSAGES[2]])
    segments = [prefix_text, handle, QUESTION]
    reuse = engine.prepare(segments, config=config("full_reuse"))
    full = engine.prepare(segments, config=config("full_recompute"))
    assert reuse.stats.reused_tokens == handle.n_tokens
    assert_close(reuse.logits, full.logits, atol=1e-5, rtol=1e-5)


def test_full_reuse_loses_cross_attention_and_cacheblend_recovers_it(make_engine):
    engine = make_engine("llama", seed=9)
    handles = engine.precompute([*PASSAGES, MESSI, RONALDO])
    segments = ["Passages:\n", *handles, "\nWho scored more?"]
    full = engine.prepare(segments, config=config("full_recompute")).logits
    reuse = engine.prepare(segments, config=config("full_reuse")).logits
    blend = engine.prepare(segments, config=config("cacheblend", recompute_ratio=0.5)).logits
    err_reuse = (reuse - full).abs().max()
    err_blend = (blend - full).abs().max()
    assert err_reuse > 1e-3  # the chunks never saw each other
    assert err_blend < err_reuse


def test_selection_counts(make_engine):
    engine = make_engine("llama", seed=1)
    handles = engine.precompute(PASSAGES)
    segments = ["Read.\n", *handles, QUESTION]
    cached = sum(h.n_tokens for h in handles)
    req = engine.prepare(segments, config=config("cacheblend", selection="deviation", recompute_ratio=0.15))
    uncached = req.stats.prompt_tokens - cached
    assert req.stats.cached_tokens == cached and req.stats.head_tokens == 0  # the first request computes the head
    assert req.stats.recomputed_tokens == round(0.15 * cached) + uncached
    assert req.stats.layer_rows[:2] == [req.stats.prompt_tokens, req.stats.recomputed_tokens]
    reuse = engine.prepare(segments, config=config("full_reuse"))  # the second computes it too, and stores it
    assert reuse.stats.head_tokens == 0
    assert reuse.stats.recomputed_tokens == uncached and reuse.stats.reused_tokens == cached
    # the later ones read it exact from the store (the deviation selection computes it up to its check layer)
    head = len(engine.tokenize(segments[0]))
    heads = engine.prepare(
        segments, config=config("cacheblend", selection="deviation", recompute_ratio=0.15, recompute_chunk_head=2)
    )
    assert heads.stats.recomputed_tokens == round(0.15 * cached) + uncached - head
    gradual = engine.prepare(
        segments, config=config("cacheblend", selection="deviation", recompute_ratio=0.1, check_layers=(1, 2))
    )
    assert gradual.stats.layer_rows[1] == round(0.2 * cached) + uncached - head
    assert gradual.stats.layer_rows[2] == round(0.1 * cached) + uncached - head


def test_a_chunk_that_ends_the_prompt_is_computed(make_engine):
    """The model answers from the prompt's last rows: a chunk with nothing after it that the model reads is computed
    (the chunk before it is then followed by computed text and stays reused)."""
    engine = make_engine("llama", seed=3)
    handles = engine.precompute(PASSAGES[:2])
    for tail in ("", "\n\n"):
        segments = ["Read.\n", *handles, tail]
        reuse = engine.prepare(segments, config=config("full_reuse"))
        assert reuse.stats.reused_tokens - reuse.stats.head_tokens == reuse.stats.cached_tokens == handles[0].n_tokens
        assert reuse.stats.unplaced_chunks == 1 and reuse.stats.fallback is None
    # the prompt is only a chunk: computed in full, as full recompute computes it
    (only,) = engine.precompute([PASSAGES[2]])
    for strategy in ("full_reuse", "cacheblend"):
        alone = engine.prepare([only], config=config(strategy))
        assert alone.stats.cached_tokens == 0 and alone.stats.unplaced_chunks == 1 and alone.stats.fallback
        assert_close(alone.logits, engine.prepare([only], config=config("full_recompute")).logits)


def test_flops_shrink_with_reuse(make_engine):
    engine = make_engine("llama", seed=3)
    segments = ["Read.\n", *engine.precompute(PASSAGES), QUESTION]
    flops = {
        s: engine.prepare(segments, config=config(s)).stats.prefill_flops
        for s in ("full_recompute", "full_reuse", "cacheblend")
    }
    assert flops["full_reuse"] < flops["cacheblend"] < flops["full_recompute"]


def test_attention_selection_counts_and_ratio_one(make_engine):
    engine = make_engine("llama", seed=5)
    handles = engine.precompute(PASSAGES)
    segments = ["Read.\n", *handles, QUESTION]
    cached = sum(h.n_tokens for h in handles)
    full = engine.prepare(segments, config=config("full_recompute"))
    att = engine.prepare(segments, config=config("cacheblend", recompute_ratio=0.2, selection="attention"))
    dev = engine.prepare(segments, config=config("cacheblend", recompute_ratio=0.2))
    uncached = att.stats.prompt_tokens - cached
    assert att.stats.recomputed_tokens == dev.stats.recomputed_tokens == round(0.2 * cached) + uncached
    assert att.stats.head_tokens == dev.stats.head_tokens == 0  # the head's first two requests compute it
    assert not torch.equal(att.logits, dev.logits)  # a different choice of tokens
    one = engine.prepare(segments, config=config("cacheblend", recompute_ratio=1.0, selection="attention"))
    assert_close(one.logits, full.logits, atol=1e-5, rtol=1e-5)


def test_attention_mass_is_a_causal_attention_sum():
    from cacheblend_rag.engine.selection import attention_mass

    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(4, 3, 8, generator=gen), torch.randn(2, 10, 8, generator=gen)
    q_pos = torch.tensor([4, 7, 9])
    mass = attention_mass(q, q_pos, keys, 0.35)
    expected = torch.zeros(10)
    for h in range(4):
        for i, p in enumerate(q_pos.tolist()):
            w = torch.softmax((keys[h // 2, : p + 1] @ q[h, i]) * 0.35, dim=0)
            expected[: p + 1] += w
    assert_close(mass, expected, atol=1e-5, rtol=1e-5)
    assert mass.sum().item() == pytest.approx(4 * 3, rel=1e-5)


def test_the_prompt_head_is_stored_from_its_second_request(make_engine):
    """A head seen once (here one holding the question) is never written; a repeated one is, then read exact."""
    engine = make_engine("llama", seed=9)
    handles = engine.precompute(PASSAGES)
    entries = len(engine.store.tiers[0])
    for question in ("Which river is longest?\n", "Which desert is largest?\n"):
        once = engine.prepare([question, *handles, QUESTION], config=config("cacheblend"))
        assert once.stats.head_tokens == 0
    assert len(engine.store.tiers[0]) == entries  # each head seen once: nothing stored for it
    segments = ["Read.\n", *handles, QUESTION]
    runs = [engine.prepare(segments, config=config("full_reuse")) for _ in range(3)]
    assert [r.stats.head_tokens for r in runs] == [0, 0, len(engine.tokenize("Read.\n"))]
    assert len(engine.store.tiers[0]) == entries + 1
    assert_close(runs[2].logits, runs[1].logits, atol=1e-5, rtol=1e-5)  # the stored head is the computed one
