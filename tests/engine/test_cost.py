"""The prefill cost estimate: blending wins on long prompts of cached chunks, never on short ones or few chunks."""

from __future__ import annotations

import pytest

from cacheblend_rag.engine.cost import CostModel, ModelShape

QWEN_1_5B = ModelShape(n_layers=28, hidden=1536, n_heads=12, n_kv_heads=2, head_dim=128, intermediate=8960)
SMOLLM2 = ModelShape(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536)


@pytest.mark.parametrize("shape", [QWEN_1_5B, SMOLLM2])
def test_long_prompt_of_chunks_blends(shape):
    # ~2,200 tokens: a 60-token head, 10 chunks of 210 tokens, a 40-token question
    spans = [(60 + 210 * i, 60 + 210 * (i + 1)) for i in range(10)]
    est = CostModel().estimate(shape, 2200, spans, ratio=0.15, probe=True)
    assert est.blend_wins and est.blend < 0.4 * est.full


@pytest.mark.parametrize("shape", [QWEN_1_5B, SMOLLM2])
def test_short_prompt_computes_in_full(shape):
    # the demo's short questions: ~100 tokens, two chunks of 12 tokens
    est = CostModel().estimate(shape, 100, [(40, 52), (53, 65)], ratio=0.15, probe=True)
    assert not est.blend_wins
    assert "computed in full" in est.reason


def test_few_cached_tokens_compute_in_full():
    est = CostModel().estimate(QWEN_1_5B, 2000, [(1000, 1030)], ratio=0.15, probe=True)
    assert not est.blend_wins


def test_cost_grows_with_the_ratio_and_the_probe():
    spans = [(50, 1050)]
    model = CostModel()
    low = model.estimate(QWEN_1_5B, 1100, spans, ratio=0.05, probe=False).blend
    high = model.estimate(QWEN_1_5B, 1100, spans, ratio=0.5, probe=False).blend
    probed = model.estimate(QWEN_1_5B, 1100, spans, ratio=0.05, probe=True).blend
    assert low < high and low < probed
    assert (
        model.estimate(QWEN_1_5B, 1100, spans, ratio=1.0, probe=False).blend
        > model.estimate(QWEN_1_5B, 1100, spans, ratio=1.0, probe=False).full * 0.99
    )  # recomputing every row costs a full prefill and more


@pytest.mark.cost_model
@pytest.mark.parametrize("selection", ["query", "bridge"])
def test_a_short_prompt_is_computed_in_full_and_stats_say_why(make_engine, selection):
    from tests.conftest import PASSAGES, config

    engine = make_engine("llama", seed=3)
    segments = ["Read the passages.\n", *engine.precompute(PASSAGES), "\nQuestion: which river reaches the Black Sea?"]
    full = engine.generate(segments, max_new_tokens=6, config=config("full_recompute"))
    exact = engine.generate(segments, max_new_tokens=6, config=config("cacheblend", selection=selection))
    assert exact.stats.fallback is not None and "computed in full" in exact.stats.fallback
    assert exact.stats.recomputed_tokens == exact.stats.prompt_tokens and exact.stats.recompute_ratio is None
    assert exact.token_ids == full.token_ids  # the exact path: full recompute's answer
    blended = engine.generate(
        segments, max_new_tokens=6, config=config("cacheblend", selection=selection, exact_when_faster=False)
    )
    assert blended.stats.fallback is None and blended.stats.recompute_ratio is not None
    assert blended.stats.recomputed_tokens < blended.stats.prompt_tokens


@pytest.mark.cost_model
def test_a_long_prompt_of_chunks_blends(make_engine):
    from tests.conftest import config

    engine = make_engine("llama", seed=3)
    texts = [f"Passage {i}: " + " ".join(f"word{i}x{j}" for j in range(50)) for i in range(8)]
    segments = ["Read.\n", *engine.precompute(texts), "\nQuestion: which passage?"]
    stats = engine.generate(segments, max_new_tokens=2, config=config("cacheblend")).stats
    assert stats.fallback is None and stats.cached_tokens > 0.9 * stats.prompt_tokens
    assert 0.1 < stats.recompute_ratio < 0.2


def test_exact_when_faster_must_be_a_bool():
    from cacheblend_rag import BlendConfig

    with pytest.raises(ValueError, match="exact_when_faster must be True or False"):
        BlendConfig(exact_when_faster="yes")
