"""Batched precompute (engine/batch_compute.py): many chunks per forward give each chunk's own KV."""

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.engine.batch_compute import batches, compute_batch, default_batch_tokens
from tests.conftest import MESSI, PASSAGES, RONALDO, config


def test_batches_group_consecutive_lengths_under_the_limit():
    assert batches([3, 4, 5, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert batches([], 8) == []
    assert default_batch_tokens(torch.device("cpu")) == 0


def test_a_batch_equals_computing_each_chunk_alone(make_engine):
    engine = make_engine("llama", seed=3)
    texts = [*PASSAGES, MESSI, RONALDO]
    ids = [engine.tokenize(t) for t in texts]
    fwd = engine.model_forward.with_backend("torch")
    with torch.inference_mode():
        batched = compute_batch(fwd, engine.chunk_source.prefix_ids, ids)
    for token_ids, kv in zip(ids, batched):
        alone = engine.chunk_source.compute(token_ids)
        assert kv.k.shape == alone.k.shape == (4, 2, len(token_ids), 16)
        assert_close(kv.k, alone.k, atol=1e-5, rtol=1e-5)
        assert_close(kv.v, alone.v, atol=1e-5, rtol=1e-5)


def test_a_batch_with_contexts_equals_computing_each_chunk_after_its_context(make_engine):
    engine = make_engine("llama", seed=3)
    ids = [engine.tokenize(t) for t in [*PASSAGES, MESSI, RONALDO]]
    contexts = [ids[1] + ids[2], [], ids[0], ids[4][:3] + ids[0], ids[3]]  # of several lengths, one empty
    fwd = engine.model_forward.with_backend("torch")
    with torch.inference_mode():
        batched = compute_batch(fwd, engine.chunk_source.prefix_ids, ids, contexts)
    for token_ids, context, kv in zip(ids, contexts, batched):
        after = engine.chunk_source.compute(token_ids, context_ids=context)
        assert kv.k.shape == after.k.shape == (4, 2, len(token_ids), 16)
        assert_close(kv.k, after.k, atol=1e-5, rtol=1e-5)
        assert_close(kv.v, after.v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 contexts for 5 chunks"):
        compute_batch(fwd, engine.chunk_source.prefix_ids, ids, contexts[:2])


@pytest.mark.parametrize("context", [0, 2])  # chunks alone, and each after its 2 nearest (the default)
def test_batched_precompute_stores_what_one_by_one_stores(make_engine, monkeypatch, context):
    one = make_engine("qwen2", seed=5)
    batched = make_engine("qwen2", seed=5)
    batched.chunk_source.batch_tokens = 96  # a few chunks per forward, and more than one forward
    texts = [*PASSAGES, MESSI, RONALDO]
    h1 = one.precompute(texts, context=context)
    calls = []
    monkeypatch.setattr(batched.chunk_source, "compute", lambda *a, **k: calls.append(a))  # never one by one
    h2 = batched.precompute(texts, context=context)
    assert not calls
    assert h1 == h2 and batched.metrics()["precomputed_chunks"] == len(texts)
    assert any(h.context_ids for h in h2) == bool(context)
    for handle in h1:
        a, b = one.store.get(handle.key), batched.store.get(handle.key)
        assert_close(b.k, a.k, atol=1e-5, rtol=1e-5)
        assert_close(b.v, a.v, atol=1e-5, rtol=1e-5)
    segments = ["Read.\n", *h2, "\nWho scored more?"]
    full = batched.prepare(segments, config=config("full_recompute")).logits
    blended = batched.prepare(segments, config=config("cacheblend", recompute_ratio=1.0)).logits
    assert_close(blended, full, atol=1e-5, rtol=1e-5)
