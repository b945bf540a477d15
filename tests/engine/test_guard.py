"""The query selection's guard (``BlendConfig.guard_ratio``): a blend whose first token differs from full_reuse's
is run again recomputing the larger share before anything is answered; one that agrees is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag import BlendConfig
from tests.conftest import PASSAGES
from tests.engine.test_plan_steps import step_all

QUESTIONS = [
    "\nQuestion: which river reaches the Black Sea?",
    "\nQuestion: who built the bridge?",
    "\nQuestion: what is the capital?",
    "\nQ: name the town.",
]


def blend(**kw) -> BlendConfig:
    return BlendConfig(recompute_ratio=0.15, exact_when_faster=False, **kw)


def first_tokens(engine, segments) -> tuple[int, int]:
    reuse = engine.prepare(segments, config=BlendConfig(strategy="full_reuse"))
    blended = engine.prepare(segments, config=blend())
    return int(reuse.logits.argmax()), int(blended.logits.argmax())


@pytest.fixture
def prompts(make_engine):
    """(engine, segments, fires) over a few tiny random models and questions: fires when the blend's first token
    differs from full_reuse's."""
    out = []
    for seed in (2, 3):
        engine = make_engine("llama", seed=seed)
        handles = engine.precompute(PASSAGES)
        for question in QUESTIONS:
            segments = ["Read the passages.\n", *handles, question]
            reused, blended = first_tokens(engine, segments)
            out.append((engine, segments, reused != blended))
    assert any(f for *_, f in out) and not all(f for *_, f in out), "need prompts where the guard fires and not"
    return out


def test_a_blend_that_changes_full_reuses_first_token_is_recomputed_in_full_with_guard_ratio_1(prompts):
    for engine, segments, fires in prompts:
        guarded = engine.prepare(segments, config=blend(guard_ratio=1.0))
        plain = engine.prepare(segments, config=blend())
        if not fires:  # the blend stands: nothing recomputed again, the same logits
            assert guarded.stats.guard is None
            assert torch.equal(guarded.logits, plain.logits)
            assert guarded.stats.prefill_flops == pytest.approx(plain.stats.prefill_flops)
            continue
        full = engine.prepare(segments, config=BlendConfig(strategy="full_recompute"))
        assert "differs from full_reuse's" in guarded.stats.guard and "100%" in guarded.stats.guard
        assert_close(guarded.logits, full.logits, rtol=1e-4, atol=1e-4)  # every cached row recomputed: exact
        assert guarded.stats.recompute_ratio == pytest.approx(1.0)
        # both passes count: the probe, the blend it set aside and the full one
        assert guarded.stats.prefill_flops > plain.stats.prefill_flops + 0.9 * full.stats.prefill_flops


def test_the_guard_recomputes_the_share_it_names(prompts):
    fired = [(engine, segments) for engine, segments, fires in prompts if fires]
    for engine, segments in fired:
        guarded = engine.prepare(segments, config=blend(guard_ratio=0.5))
        half = engine.prepare(segments, config=BlendConfig(recompute_ratio=0.5, exact_when_faster=False))
        assert "50%" in guarded.stats.guard
        assert guarded.stats.recompute_ratio == pytest.approx(half.stats.recompute_ratio, abs=0.01)
        assert_close(guarded.logits, half.logits, rtol=1e-4, atol=1e-4)


def test_a_guarded_request_steps_a_layer_at_a_time_through_both_passes(prompts):
    engine, segments, _ = next(p for p in prompts if p[2])
    yields, request = step_all(engine.prepare_steps(segments, config=blend(guard_ratio=1.0)))
    layers = engine.model_forward.n_layers
    assert request.stats.guard is not None
    assert len(yields) == 3 * layers  # the probe pass, the blend set aside, the recompute
    assert yields[-layers:] == request.stats.layer_rows


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, "half", True])
def test_guard_ratio_must_be_a_share(bad):
    with pytest.raises(ValueError, match="guard_ratio must be a number in"):
        BlendConfig(guard_ratio=bad)


def test_guard_ratio_needs_the_query_selection():
    with pytest.raises(ValueError, match="selection='query'"):
        BlendConfig(selection="deviation", guard_ratio=0.5)
    with pytest.raises(ValueError, match="guard_ratio"):
        BlendConfig(strategy="full_reuse", guard_ratio=0.5)
