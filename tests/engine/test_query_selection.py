"""Query-aware selection (probe pass + fixed recompute set) and fidelity targets."""

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag import BlendConfig
from cacheblend_rag.engine.selection import Budget
from cacheblend_rag.engine.strategies.query import TailAttention
from tests.conftest import PASSAGES, config

QUESTION = "\nQuestion: which river reaches the Black Sea?"


def prompt(engine):
    handles = engine.precompute(PASSAGES)
    return ["Read the passages.\n", *handles, QUESTION], sum(h.n_tokens for h in handles)


@pytest.mark.parametrize("selection", ["query", "bridge"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_query_selection_spans_full_reuse_to_full_recompute(arch, selection, make_engine):
    engine = make_engine(arch, seed=11)
    segments, _ = prompt(engine)
    full = engine.prepare(segments, config=config("full_recompute"))
    reuse = engine.prepare(segments, config=config("full_reuse"))
    none = engine.prepare(segments, config=config("cacheblend", selection=selection, recompute_ratio=0.0))
    every = engine.prepare(segments, config=config("cacheblend", selection=selection, recompute_ratio=1.0))
    # the same rows, but the head's in the probe pass, so in matmuls of other sizes: fp32 summation order apart
    assert_close(none.logits, reuse.logits, atol=1e-5, rtol=1e-5)
    assert_close(every.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert every.stats.recompute_ratio == 1.0 and none.stats.recompute_ratio == 0.0


def test_query_selection_counts_and_stats(make_engine):
    engine = make_engine("llama", seed=12)
    segments, cached = prompt(engine)
    req = engine.prepare(segments, config=config("cacheblend", selection="query", recompute_ratio=0.2))
    uncached = req.stats.prompt_tokens - cached
    assert req.stats.recomputed_tokens == round(0.2 * cached) + uncached
    # no layer runs for every token: the same rows are computed through every layer, the prompt's head (rows
    # before the first chunk) only in the probe pass, whose K/V for them is exact
    head = len(engine.tokenize(segments[0]))
    assert set(req.stats.layer_rows) == {req.stats.recomputed_tokens - head}
    assert req.stats.recompute_ratio == pytest.approx(round(0.2 * cached) / cached)
    assert 0 < req.stats.probe_s <= req.stats.prefill_s
    dev = engine.prepare(segments, config=config("cacheblend", selection="deviation", recompute_ratio=0.2))
    assert not torch.equal(req.logits, dev.logits)
    heads = engine.prepare(
        segments, config=config("cacheblend", selection="query", recompute_ratio=0.2, recompute_chunk_head=3)
    )
    # the prompt's head, stored by the first request, is read exact by the later ones
    assert heads.stats.head_tokens == head and req.stats.head_tokens == 0
    assert heads.stats.recomputed_tokens == round(0.2 * cached) + uncached - head
    assert heads.stats.reused_tokens == cached - round(0.2 * cached) + head


def test_tail_attention_scores_what_the_probes_read():
    gen = torch.Generator().manual_seed(0)
    n, d = 12, 8
    keys = torch.randn(1, n, d, generator=gen) * 0.1
    q = torch.zeros(2, 3, d)
    q[:, :, 0] = 10.0
    keys[0, 4, 0] = 3.0  # row 4 is what every probe reads
    from_cache = torch.zeros(n, dtype=torch.bool)
    from_cache[2:8] = True
    tail = TailAttention(from_cache, probes=torch.tensor([1, 2]), scale=1.0)
    tail(0, q, torch.tensor([0, 9, 11]), keys)  # row 0 is before the first chunk: not a probe
    assert int(tail.scores.argmax()) == 4
    assert tail.scores[~from_cache].abs().sum() == 0
    assert tail.scores.sum().item() == pytest.approx(1.0)  # shares of one layer


def test_budget_rows():
    scores = torch.tensor([8.0, 1.0, 1.0, 0.0])
    assert Budget(0.25).rows(scores, n_cached=8, n_forced_cached=0) == 2
    # 8 of 10 is enough for 0.8; with 1 forced row that makes 2
    assert Budget(0.0, target=0.8, max_ratio=1.0).rows(scores, 8, 1) == 2
    assert Budget(0.0, target=0.85, max_ratio=1.0).rows(scores, 8, 0) == 2
    assert Budget(0.0, target=1.0, max_ratio=1.0).rows(scores, 8, 0) == 3
    assert Budget(0.0, target=1.0, max_ratio=0.25).rows(scores, 8, 0) == 2  # capped
    assert Budget(0.0, target=0.1, min_ratio=0.5).rows(scores, 8, 0) == 4  # floored


@pytest.mark.parametrize("selection", ["query", "bridge", "deviation"])
def test_fidelity_target_chooses_the_ratio(selection, make_engine):
    engine = make_engine("llama", seed=13)
    segments, _ = prompt(engine)
    full = engine.prepare(segments, config=config("full_recompute"))
    ratios = []
    for target in (0.3, 0.6, 0.9):
        cfg = config("cacheblend", selection=selection, fidelity_target=target, min_ratio=0.05, max_ratio=0.8)
        stats = engine.prepare(segments, config=cfg).stats
        assert 0.05 - 1e-9 <= stats.recompute_ratio <= 0.8 + 1e-9
        ratios.append(stats.recompute_ratio)
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    everything = config("cacheblend", selection=selection, fidelity_target=1.0, max_ratio=1.0)
    assert_close(engine.prepare(segments, config=everything).logits, full.logits, atol=1e-5, rtol=1e-5)


def test_fidelity_target_validation():
    with pytest.raises(ValueError, match=r"fidelity_target must be a number in \(0, 1\]"):
        BlendConfig(fidelity_target=0)
    with pytest.raises(ValueError, match="needs one check layer"):
        BlendConfig(selection="deviation", fidelity_target=0.9, check_layers=(1, 2))
    with pytest.raises(ValueError, match=r"min_ratio .* must not exceed max_ratio"):
        BlendConfig(min_ratio=0.6, max_ratio=0.5)
    with pytest.raises(ValueError, match="max_ratio must be a number"):
        BlendConfig(max_ratio=float("nan"))
    assert BlendConfig(selection="query", fidelity_target=0.9).fidelity_target == 0.9
    with pytest.raises(ValueError, match=r"check_layers=\(1, 2\) does nothing with .*selection='query'"):
        BlendConfig(selection="query", fidelity_target=0.9, check_layers=(1, 2))


def test_query_selection_keeps_the_probe_pass_head(make_engine):
    """The rows before the first chunk are computed once, in the probe pass: their K/V is full recompute's."""
    engine = make_engine("llama", seed=13)
    segments, _ = prompt(engine)
    head = len(engine.tokenize(segments[0]))
    full = engine.prepare(segments, config=config("full_recompute"))
    blend = engine.prepare(segments, config=config("cacheblend", selection="query", recompute_ratio=0.2))
    assert head > 1 and blend.stats.layer_rows[0] == blend.stats.recomputed_tokens - head
    for layer in range(full.fwd.n_layers):
        k_full, v_full = full.cache.layer(layer, head)
        k_blend, v_blend = blend.cache.layer(layer, head)
        assert_close(k_blend, k_full, atol=1e-5, rtol=1e-5)
        assert_close(v_blend, v_full, atol=1e-5, rtol=1e-5)
