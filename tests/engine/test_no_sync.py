"""The layer loop never waits for the device (docs/GPU.md): every count it needs comes from the plan on the host.

On a CPU this is checked by construction: after the plan is made, the prefill (and the query selection's probe
pass) runs on the kernels a GPU runs (``Kernels(reads_host=False)``) while every Python-level way of reading a
tensor's values on the host raises. Where CUDA is present, the same prefills also run under
``torch.cuda.set_sync_debug_mode("error")``, which catches the reads made inside torch as well.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.engine.chunk_reads import RequestChunks
from cacheblend_rag.engine.kv_cache import KVCache
from cacheblend_rag.engine.plan import PlanReport
from cacheblend_rag.engine.prefill import prefill
from cacheblend_rag.engine.strategies import CacheBlend, reuse_chunks, strategy_for
from cacheblend_rag.kernels import Kernels
from tests.conftest import PASSAGES, config

QUESTION = "\nQuestion: which river reaches the Black Sea?"
READS = ("item", "tolist", "numpy", "nonzero", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Any read of tensor values on the host (item, int(), bool(), tolist, nonzero, aminmax, a boolean-mask index:
    each one a device sync on CUDA) raises inside this block."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    saved_getitem = torch.Tensor.__getitem__
    saved_fns = {name: getattr(torch, name) for name in ("nonzero", "aminmax", "unique", "masked_select")}

    def forbid(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host read inside the layer loop: {name}")

        return raise_

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("host read inside the layer loop: boolean-mask indexing (its size is read back)")
        return saved_getitem(self, index)

    try:
        for name in READS:
            setattr(torch.Tensor, name, forbid(f"Tensor.{name}"))
        for name in saved_fns:
            setattr(torch, name, forbid(f"torch.{name}"))
        torch.Tensor.__getitem__ = getitem
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in saved_fns.items():
            setattr(torch, name, fn)
        torch.Tensor.__getitem__ = saved_getitem


def gpu_like(fwd):
    """``fwd`` on the torch kernels with the CPU shortcuts that read positions on the host turned off."""
    other = copy.copy(fwd)
    other.kernels = Kernels("torch", reads_host=False)
    return other


def run(engine, segments, cfg, fwd, guard):
    """The request's host work (placement, chunk reads, forced rows) first, then, under ``guard``, what runs on the
    device: the selection's plan (the query selection's probe pass) and the prefill."""
    blocks = engine.blocks(segments, None)
    strategy = strategy_for(cfg)
    chunks = RequestChunks(engine.chunk_source, fwd)
    cache = KVCache.for_model(fwd, blocks[-1].end + 4)
    if isinstance(strategy, CacheBlend):
        reused = reuse_chunks(blocks, chunks, cfg.recompute_chunk_head, PlanReport(strategy="cacheblend", blend=True))

        def make_plan():
            return strategy.selection.plan(reused, fwd, cache)
    else:
        ready = strategy.plan(blocks, chunks, fwd, cache)

        def make_plan():
            return ready

    with torch.inference_mode(), guard():
        result = prefill(fwd, make_plan(), cache)
    return result


CONFIGS = [
    config("full_reuse"),
    config("cacheblend"),  # the default: query selection
    config("cacheblend", selection="deviation", recompute_ratio=0.3),
    config("cacheblend", selection="deviation", recompute_ratio=0.3, check_layers=(1, 2), deviation="k"),
    config("cacheblend", selection="attention", recompute_ratio=0.3),
    config("cacheblend", selection="bridge", recompute_ratio=0.3),  # probe, hop and prefill proper
    config("cacheblend", recompute_ratio=1.0),
    config("full_recompute"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.strategy}-{c.selection}-{c.recompute_ratio}")
def test_the_layer_loop_reads_nothing_back_from_the_device(make_engine, cfg):
    engine = make_engine("llama", seed=11)
    segments = ["Read the passages.\n", *engine.precompute(PASSAGES), QUESTION]
    result = run(engine, segments, cfg, gpu_like(engine.model_forward), no_host_reads)
    reference = engine.prepare(segments, config=cfg)  # the CPU path, free to read on the host
    assert_close(result.logits, reference.logits, atol=1e-5, rtol=1e-5)
    assert result.layer_rows == reference.stats.layer_rows


def test_the_guard_catches_a_host_read():
    with no_host_reads(), pytest.raises(AssertionError, match="item"):
        torch.ones(2).sum().item()
    with no_host_reads(), pytest.raises(AssertionError, match="boolean-mask"):
        torch.ones(3)[torch.tensor([True, False, True])]
    assert torch.ones(2).sum().item() == 2.0  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode only sees CUDA syncs")
@pytest.mark.parametrize("strategy", ["cacheblend", "full_reuse"])
@pytest.mark.parametrize("tier", ["memory://?device=cuda&max_bytes=1GB", "memory://?pin=1&max_bytes=1GB"])
def test_no_cuda_sync_after_warm_up(make_engine, strategy, tier):
    """A device-tier hit and a pinned-tier hit (copied layer by layer on the side stream) alike."""
    engine = make_engine("llama", seed=11, model=_cuda_model(), store=[tier], store_dtype=torch.bfloat16)
    segments = ["Read the passages.\n", *engine.precompute(PASSAGES), QUESTION]
    cfg = config(strategy, backend="triton")
    fwd = engine.model_forward.with_backend("triton")

    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    run(engine, segments, cfg, fwd, contextlib.nullcontext)  # warm-up: tables, compiled kernels
    run(engine, segments, cfg, fwd, sync_errors)


def _cuda_model():
    from tests.conftest import tiny_model

    return tiny_model("llama", seed=11).to(device="cuda", dtype=torch.bfloat16)
