"""The bridge selection: the query selection's budget split between what the tail reads and what that reads."""

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.engine.selection import cross_chunk_shares
from cacheblend_rag.engine.strategies.bridge import HOP_SHARE, CrossChunkReads
from tests.conftest import config
from tests.engine.test_query_selection import prompt


def test_bridge_recomputes_as_many_rows_as_the_query_selection(make_engine):
    engine = make_engine("llama", seed=22)
    segments, cached = prompt(engine)
    query = engine.prepare(segments, config=config("cacheblend", selection="query", recompute_ratio=0.3))
    bridge = engine.prepare(segments, config=config("cacheblend", selection="bridge", recompute_ratio=0.3))
    k = round(0.3 * cached)
    assert bridge.stats.recomputed_tokens == query.stats.recomputed_tokens
    assert bridge.stats.recompute_ratio == pytest.approx(k / cached)
    head = len(engine.tokenize(segments[0]))
    uncached_after_head = bridge.stats.prompt_tokens - cached - head
    # the prefill proper computes the forced rows and hop 2; hop 1 was computed by the hop pass and kept
    assert set(bridge.stats.layer_rows) == {uncached_after_head + k - round(HOP_SHARE * k)}
    # the same rows computed as often as the query selection's (hop 1 in the hop pass, without its last layer's
    # attention and MLP): about the same FLOPs
    assert bridge.stats.prefill_flops == pytest.approx(query.stats.prefill_flops, rel=0.02)
    assert not torch.equal(bridge.logits, query.logits)
    assert 0 < bridge.stats.probe_s <= bridge.stats.prefill_s


def test_bridge_refuses_the_guard(make_engine):
    engine = make_engine("llama", seed=23)
    segments, _ = prompt(engine)
    with pytest.raises(ValueError, match="guard_ratio"):
        engine.prepare(segments, config=config("cacheblend", selection="bridge", guard_ratio=0.5))


def scores_case(seed: int, queries: int):
    """10 rows (head row 0, chunks 0: rows 1-3, 1: rows 4-6, a separator at 7, chunk 2: rows 8-9), one KV head of 8
    dims and two query heads: keys [1, 10, 8], q [2, queries, 8], chunk_of [10]."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 10, 8, generator=gen)
    q = torch.randn(2, queries, 8, generator=gen)
    return keys, q, torch.tensor([-1, 0, 0, 0, 1, 1, 1, -1, 2, 2])


def test_cross_chunk_shares_count_other_chunks_only():
    keys, q, chunk_of = scores_case(0, 2)
    n = keys.shape[1]
    q_pos = torch.tensor([5, 9])  # a row of chunk 1 and one of chunk 2
    got = cross_chunk_shares(q, q_pos, keys, 0.5, chunk_of)
    want = torch.zeros(n)
    for i, pos in enumerate(q_pos.tolist()):
        probs = torch.softmax((q[:, i] @ keys[0, : pos + 1].T) * 0.5, dim=-1).sum(0)  # [pos + 1]
        other = torch.tensor([c >= 0 and c != chunk_of[pos] for c in chunk_of[: pos + 1].tolist()])
        share = probs * other
        want[: pos + 1] += share / share.sum()
    assert_close(got, want)
    assert got[[0, 7, 8, 9]].abs().sum() == 0 and got.sum().item() == pytest.approx(2.0)  # uncached, own chunk


def test_cross_chunk_reads_skip_the_first_half_and_score_only_readers():
    keys, q, chunk_of = scores_case(1, 3)
    rows = torch.tensor([2, 5, 9])
    reads = CrossChunkReads(chunk_of, readers=torch.tensor([1]), scale=0.5, first_layer=2)
    reads(1, q, rows, keys)
    assert reads.scores.abs().sum() == 0
    reads(2, q, rows, keys)
    assert_close(reads.scores, cross_chunk_shares(q[:, 1:2], rows[1:2], keys, 0.5, chunk_of))
