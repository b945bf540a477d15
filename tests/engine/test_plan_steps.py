"""A request's prefill a step at a time (what the batching server interleaves with decoding): the query
selection's probe pass runs a layer per step like the prefill proper, the steps compute exactly what the unstepped
prefill computes, and a chunk read that fails in a probe step plans the request again."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.engine import strategy_for
from cacheblend_rag.engine.chunk_reads import RequestChunks
from cacheblend_rag.engine.kv_cache import KVCache
from cacheblend_rag.engine.prefill import prefill
from cacheblend_rag.engine.prepare import run_strategy_steps
from cacheblend_rag.testing import flip_tensor
from tests.conftest import PASSAGES, config

QUESTION = "\nQuestion: which river reaches the Black Sea?"


def segments(handles, question: str = QUESTION):
    return ["Read the passages.\n", *handles, question]


def step_all(steps) -> tuple[list[int], object]:
    """Every yield of ``steps`` and its value; no step leaves inference mode on for whoever steps it."""
    yields = []
    while True:
        try:
            yields.append(next(steps))
        except StopIteration as done:
            return yields, done.value
        assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize(
    "cfg, probes",
    [
        (config("cacheblend"), True),  # the default: query selection
        (config("cacheblend", selection="bridge"), True),  # probe, hop (all but its last layer) and prefill proper
        (config("cacheblend", selection="deviation"), False),
        (config("full_reuse"), False),
    ],
)
def test_the_probe_pass_and_the_prefill_each_run_a_layer_per_step(make_engine, cfg, probes):
    engine = make_engine("llama", seed=3)
    handles = engine.precompute(PASSAGES)
    runs = engine.blocks(segments(handles))
    fwd = engine.model_forward
    chunks = RequestChunks(engine.chunk_source, fwd)
    cache = KVCache.for_model(fwd, runs[-1].end)
    steps = run_strategy_steps(strategy_for(cfg), runs, chunks, fwd, cache, engine.store)
    yields, (plan, result, stats) = step_all(steps)
    probe = plan.report.probe
    assert (probe is not None) == probes and plan.report.hits == 3
    probe_rows = probe.layer_rows if probes else []
    hop = plan.report.hop
    hop_rows = hop.layer_rows[:-1] if hop is not None else []  # no step after its last K/V is written
    assert (hop is not None) == (cfg.selection == "bridge")
    assert len(yields) == len(probe_rows) + len(hop_rows) + len(result.layer_rows)
    assert len(probe_rows) + len(result.layer_rows) == (2 if probes else 1) * fwd.n_layers
    assert yields == probe_rows + hop_rows + result.layer_rows  # each step yields the rows its layer computed
    if probes:  # the probe pass computes the uncached rows at every layer
        uncached = runs[-1].end - sum(h.n_tokens for h in handles)
        assert probe_rows == [uncached] * fwd.n_layers
        assert 0 < stats.probe_s <= stats.prefill_s


@pytest.mark.parametrize("selection", ["query", "bridge"])
def test_stepped_interleaved_with_another_request_equals_the_unstepped_plan_and_prefill(make_engine, selection):
    """The query selection (and the bridge's three passes) with reused chunks, stepped through
    ``engine.prepare_steps`` alternately with another request's steps, fills the same cache and gives the same
    logits, bit for bit, as its plan and prefill run in one go."""
    engine = make_engine("llama", seed=4)
    handles = engine.precompute(PASSAGES)
    cfg = config("cacheblend", recompute_ratio=0.3, selection=selection)
    runs = engine.blocks(segments(handles))
    fwd = engine.model_forward
    n = runs[-1].end
    cache = KVCache.for_model(fwd, n)
    with torch.inference_mode():
        plan = strategy_for(cfg).plan(runs, RequestChunks(engine.chunk_source, fwd), fwd, cache)
        whole = prefill(fwd, plan, cache)
    assert plan.cache_ready and plan.report.probe is not None

    other = engine.prepare_steps(segments(handles[::-1], "\nQuestion: how high is Kilimanjaro?"), config=cfg)
    mine = engine.prepare_steps(blocks=runs, config=cfg)
    done = {}
    while len(done) < 2:  # one step of each in turn
        for name, steps in (("mine", mine), ("other", other)):
            if name in done:
                continue
            try:
                next(steps)
            except StopIteration as end:
                done[name] = end.value
            assert not torch.is_inference_mode_enabled()
    stepped = done["mine"]
    assert_close(stepped.logits, whole.logits, atol=0, rtol=0)
    assert stepped.stats.layer_rows == whole.layer_rows
    for layer in range(fwd.n_layers):
        for got, want in zip(stepped.cache.layer(layer, n), cache.layer(layer, n)):
            assert torch.equal(got, want)


def test_a_read_failure_in_a_probe_step_plans_again(make_engine, monkeypatch):
    """Layer 2 of a chunk on disk is corrupt: the probe pass stops at its third step (two probe layers have yielded),
    the request is planned again with the chunk computed, and its result is the unfailed one."""
    engine = make_engine("llama", seed=8, disk=True)
    handles = engine.precompute(PASSAGES)
    cfg = config("cacheblend")  # the query selection: its probe pass is the first to read each layer
    reference = engine.prepare(segments(handles), config=cfg)
    memory, disk = engine.store.tiers
    memory.clear()  # every chunk is read from disk, layer by layer
    flip_tensor(disk, handles[1].key, "v.2")
    yields: list[int] = []
    failed_at: list[int] = []  # the yields before each read failure
    read_failed = RequestChunks.read_failed

    def recording(self, error):
        failed_at.append(len(yields))
        return read_failed(self, error)

    monkeypatch.setattr(RequestChunks, "read_failed", recording)
    steps = engine.prepare_steps(segments(handles), config=cfg)
    while True:
        try:
            yields.append(next(steps))
        except StopIteration as done:
            again = done.value
            break
    n_layers = engine.model_forward.n_layers
    assert failed_at == [2]  # inside the probe pass, after its first two layers' steps
    assert len(yields) == 2 + 2 * n_layers  # then a whole probe pass and prefill on the new plan
    assert again.stats.cache_misses == 1 and again.stats.cache_hits == 2
    assert_close(again.logits, reference.logits, atol=0, rtol=0)
    assert disk.contains(handles[1].key)  # the computed chunk was stored again
