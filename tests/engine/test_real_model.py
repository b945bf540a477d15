"""The strategies on the real SmolLM2-135M-Instruct (offline GGUF, converted once)."""

import pytest
from torch.testing import assert_close

from tests.conftest import MESSI, PASSAGES, RONALDO, config

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def prompt(smollm2_engine):
    engine = smollm2_engine
    handles = engine.precompute([MESSI, RONALDO, *PASSAGES])
    segments = engine.chat_segments(
        ["Answer from the passages.\n", *handles, "\nQuestion: How many goals did Messi score at World Cups?"]
    )
    return engine, handles, segments


def test_ratio_one_equals_full_recompute(prompt):
    engine, _, segments = prompt
    full = engine.prepare(segments, config=config("full_recompute"))
    blend = engine.prepare(segments, config=config("cacheblend", recompute_ratio=1.0))
    assert_close(blend.logits, full.logits, atol=1e-4, rtol=1e-4)
    a = engine.generate(segments, max_new_tokens=12, config=config("full_recompute"))
    b = engine.generate(segments, max_new_tokens=12, config=config("cacheblend", recompute_ratio=1.0))
    assert a.token_ids == b.token_ids and "13" in a.text


def test_cacheblend_recomputes_fifteen_percent_plus_uncached(prompt):
    engine, handles, segments = prompt
    result = engine.generate(segments, max_new_tokens=12, config=config("cacheblend", recompute_ratio=0.15))
    stats = result.stats
    cached = sum(h.n_tokens for h in handles)
    assert stats.cached_tokens == cached and stats.cache_hits == len(handles) and stats.cache_misses == 0
    head = stats.head_tokens  # the prompt's head, if an earlier request stored it
    assert stats.recomputed_tokens == round(0.15 * cached) + (stats.prompt_tokens - cached - head)
    assert stats.reused_tokens == cached - round(0.15 * cached) + head
    assert result.text.strip()


def test_prefix_cache_matches_full_recompute_on_smollm2(prompt):
    engine, _, segments = prompt
    full = engine.prepare(segments, config=config("full_recompute"))
    engine.prepare(segments, config=config("prefix_cache"))
    again = engine.prepare(segments, config=config("prefix_cache"))
    assert again.stats.reused_tokens > 0
    # the default store keeps float16, so reuse is close rather than bit-exact
    assert_close(again.logits, full.logits, atol=0.05, rtol=0.01)
    assert again.logits.argmax() == full.logits.argmax()
