"""Strategies and selections as objects: ``strategy_for`` chooses them, options belong to whoever reads them, a
plan is frozen, a late read failure plans the request again, and a new selection rule is one class."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag import BlendConfig
from cacheblend_rag.engine import (
    PrefillPlan,
    Selection,
    reused_prompt,
    run_plan,
    strategy_for,
    teacher_force,
)
from cacheblend_rag.engine.chunk_reads import RequestChunks
from cacheblend_rag.engine.kv_cache import KVCache
from cacheblend_rag.engine.strategies import (
    SELECTIONS,
    AttentionSelection,
    CacheBlend,
    DeviationSelection,
    FullRecompute,
    FullReuse,
    PrefixCache,
    QuerySelection,
    options_read,
)
from cacheblend_rag.testing import flip_tensor
from tests.conftest import PASSAGES, config

QUESTION = "\nQuestion: which river reaches the Black Sea?"


def segments(handles):
    return ["Read the passages.\n", *handles, QUESTION]


# ---- choosing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, strategy, selection",
    [
        (BlendConfig(strategy="full_recompute"), FullRecompute, None),
        (BlendConfig(strategy="prefix_cache"), PrefixCache, None),
        (BlendConfig(strategy="full_reuse"), FullReuse, None),
        (BlendConfig(), CacheBlend, QuerySelection),
        (BlendConfig(selection="deviation"), CacheBlend, DeviationSelection),
        (BlendConfig(selection="attention"), CacheBlend, AttentionSelection),
    ],
)
def test_strategy_for_picks_each_class(cfg, strategy, selection):
    made = strategy_for(cfg)
    assert type(made) is strategy
    assert (type(made.selection) if selection is not None else None) is selection
    assert made.name == cfg.strategy


def test_the_deviation_selections_default_to_layer_one_and_values():
    rule = strategy_for(BlendConfig(selection="attention", recompute_ratio=0.2)).selection
    assert (rule.layers, rule.ratios, rule.deviation) == ((1,), (0.2,), "v")
    gradual = strategy_for(BlendConfig(selection="deviation", recompute_ratio=0.1, check_layers=(1, 2, 3))).selection
    assert gradual.ratios == (0.4, 0.2, 0.1)


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (
            {"selection": "query", "check_layers": (2,)},
            "check_layers=(2,) does nothing with strategy='cacheblend' with",
        ),
        ({"check_ratios": (0.15,)}, "check_ratios=(0.15,) does nothing with strategy='cacheblend' with selection='q"),
        ({"strategy": "full_reuse", "deviation": "k"}, "deviation='k' does nothing with strategy='full_reuse'"),
        ({"strategy": "full_recompute", "check_layers": (1,)}, "check_layers=(1,) does nothing"),
        ({"strategy": "prefix_cache", "fidelity_target": 0.5}, "fidelity_target=0.5 does nothing"),
    ],
)
def test_an_option_the_strategy_ignores_is_refused_with_the_fix(kwargs, says):
    with pytest.raises(ValueError, match=r"leave it out, or use strategy=") as caught:
        BlendConfig(**kwargs)
    assert says in str(caught.value)


def test_options_follow_the_strategy_through_replace():
    deviation = BlendConfig(selection="deviation", check_layers=(2,), deviation="k")
    with pytest.raises(ValueError, match=r"check_layers=.* does nothing with strategy='cacheblend' with selection='q"):
        deviation.replace(selection="query")
    assert deviation.replace(selection="attention").check_layers == (2,)
    assert BlendConfig().replace(strategy="full_reuse").strategy == "full_reuse"  # the default config moves freely
    assert "check_layers" in options_read("cacheblend", "deviation")
    assert "check_layers" not in options_read("cacheblend", "query") | options_read("full_reuse")


# ---- plans ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg", [config("cacheblend"), config("cacheblend", selection="deviation"), config("full_reuse")]
)
def test_a_plan_is_built_once_and_frozen(make_engine, cfg):
    engine = make_engine("llama", seed=2)
    runs = engine.blocks(segments(engine.precompute(PASSAGES)))
    fwd = engine.model_forward
    with torch.inference_mode():
        plan = strategy_for(cfg).plan(runs, RequestChunks(engine.chunk_source, fwd), fwd, KVCache.for_model(fwd, 300))
    assert isinstance(plan, PrefillPlan) and isinstance(plan.spans, tuple) and plan.report.hits == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.checks = {}
    with pytest.raises(TypeError):
        plan.checks[1] = 0.5  # a read-only mapping
    assert bool(plan.checks) == (cfg.selection == "deviation" and cfg.strategy == "cacheblend")


# ---- a read that fails inside the prefill -------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["query", "bridge", "deviation"])
def test_a_late_read_failure_plans_again_without_a_prefill_inside_the_prefill(make_engine, monkeypatch, selection):
    """The query selection reads the chunks in its probe pass (inside the plan), the deviation selection in the
    prefill proper: either way the failed chunk is computed between two plans, never from inside a prefill."""
    engine = make_engine("llama", seed=8, disk=True)
    handles = engine.precompute(PASSAGES)
    cfg = config("cacheblend", selection=selection)
    reference = engine.prepare(segments(handles), config=cfg)
    memory, disk = engine.store.tiers
    memory.clear()  # every chunk is read from disk, layer by layer
    flip_tensor(disk, handles[1].key, "v.2")
    plans, computed = [], []
    plan_steps, compute = CacheBlend.plan_steps, engine.chunk_source.compute

    def counting_plan_steps(self, *args):
        plans.append(1)
        return plan_steps(self, *args)

    def computing(token_ids, fwd=None, context_ids=()):
        loops = ("prefill", "prefill_steps")
        frames = [f for f in inspect.stack() if f.function in loops and f.filename.endswith("prefill.py")]
        computed.append(len(frames))
        return compute(token_ids, fwd, context_ids)

    monkeypatch.setattr(CacheBlend, "plan_steps", counting_plan_steps)
    monkeypatch.setattr(engine.chunk_source, "compute", computing)
    again = engine.prepare(segments(handles), config=cfg)
    assert len(plans) == 2 and computed == [0]  # planned twice; the chunk computed once, outside any prefill loop
    assert again.stats.cache_misses == 1 and again.stats.cache_hits == 2
    assert_close(again.logits, reference.logits, atol=0, rtol=0)
    assert disk.contains(handles[1].key)  # the computed chunk was stored again


def test_a_chunk_that_fails_again_after_it_was_computed_is_an_error(make_engine):
    from cacheblend_rag.store import ChunkReadError

    engine = make_engine("llama", seed=8)
    (handle,) = engine.precompute(PASSAGES[:1])
    chunks = RequestChunks(engine.chunk_source, engine.model_forward)
    chunks.fetch([handle])
    error = ChunkReadError(handle.key, "disk", OSError("gone"))
    chunks.read_failed(error)
    assert chunks.fetch([handle])[1:] == (0, 1)  # computed: a miss
    with pytest.raises(ChunkReadError):
        chunks.read_failed(error)


# ---- a new selection rule -----------------------------------------------------------------------------------------
class FirstTokens(Selection):
    """Test-only rule: recompute the first ``ceil(recompute_ratio x T)`` tokens of every chunk of T tokens (host
    tensors: the tests run on the CPU)."""

    name = "first_tokens"

    def plan(self, reused, fwd, cache):
        forced = reused.forced.clone()  # [N] bool: the rows every plan computes
        cached = torch.zeros_like(forced)
        for span in reused.spans:
            forced[span.start : span.start + math.ceil(self.config.recompute_ratio * span.kv.n_tokens)] = True
            cached[span.start : span.end] = True
        counts = (int(forced.sum()), int((forced & cached).sum()))
        rows = forced.nonzero().squeeze(1)
        return PrefillPlan(
            ids=reused.ids,
            spans=reused.spans,
            initial=rows,
            forced=forced,
            n_forced=counts,
            report=reused.report,
        )


def test_a_new_selection_rule_is_one_class(make_engine, monkeypatch):
    monkeypatch.setitem(SELECTIONS, FirstTokens.name, FirstTokens)
    with pytest.raises(ValueError, match=r"check_layers=.* does nothing with .*selection='first_tokens'"):
        BlendConfig(selection="first_tokens", check_layers=(1,))
    engine = make_engine("llama", seed=4)
    handles = engine.precompute(PASSAGES)
    prompt = segments(handles)
    result = engine.generate(prompt, max_new_tokens=4, config=config("cacheblend", selection="first_tokens"))
    stats = result.stats
    heads = sum(math.ceil(0.15 * h.n_tokens) for h in handles)
    assert stats.cache_hits == 3 and stats.recomputed_tokens == stats.prompt_tokens - stats.cached_tokens + heads
    assert set(stats.layer_rows) == {stats.recomputed_tokens} and stats.recompute_ratio == heads / stats.cached_tokens
    assert len(result.token_ids) == 4
    every = engine.prepare(prompt, config=config("cacheblend", selection="first_tokens", recompute_ratio=1.0))
    full = engine.prepare(prompt, config=config("full_recompute"))
    assert_close(every.logits, full.logits, atol=1e-5, rtol=1e-5)


# ---- the research API ---------------------------------------------------------------------------------------------
def test_the_research_api_runs_the_plans_the_engine_runs(make_engine):
    engine = make_engine("llama", seed=6)
    prompt_segments = segments(engine.precompute(PASSAGES))
    prompt = reused_prompt(engine, prompt_segments)
    assert len(prompt.spans) == 3 and prompt.rows.numel() == sum(s.kv.n_tokens for s in prompt.spans)
    reuse = engine.prepare(prompt_segments, config=config("full_reuse"), extra_capacity=4)
    assert_close(run_plan(engine, prompt.plan()).logits, reuse.logits, atol=0, rtol=0)
    full = engine.prepare(prompt_segments, config=config("full_recompute"), extra_capacity=4)
    every = run_plan(engine, prompt.plan(prompt.rows), extra_capacity=4)
    assert_close(every.logits, full.logits, atol=1e-5, rtol=1e-5)
    targets = [5, 17, 99]
    assert_close(teacher_force(every, targets), teacher_force(full, targets), atol=1e-4, rtol=1e-4)
    captured = run_plan(engine, prompt.full_plan(capture=True)).captured
    assert captured.k.shape[2] == prompt.n
