"""The batch paths decode their inputs together: CacheBlendLLM's prompts of one call (``batch``, ``abatch``:
``engine.generate_batch``'s BatchGeneration) and ChatCacheBlend's ``batch`` / ``abatch`` (the engine's shared
batch), with the answers each input gets alone (a tiny float32 model: exact)."""

from __future__ import annotations

import asyncio
import time

import pytest
from langchain_cacheblend import CacheBlendLLM, ChatCacheBlend
from langchain_core.messages import HumanMessage

from cacheblend_rag.engine.batch_loop import BatchLoop
from cacheblend_rag.engine.batch_worker import batch_worker

PROMPTS = ["The river flows", "Mountains are tall because", "Once upon a time in a small harbour"]


@pytest.fixture
def sizes(monkeypatch) -> list[int]:
    """The number of sequences of every batched decoding step (the real step runs)."""
    seen: list[int] = []
    step = BatchLoop.decode_step

    def recorded(self):
        seen.append(len(self.pool))
        return step(self)

    monkeypatch.setattr(BatchLoop, "decode_step", recorded)
    return seen


def hold_until_all_submitted(engine, n: int) -> None:
    """The shared batch's next decoding step waits until ``n`` requests are submitted (the batch runs in a thread of
    its own: the other submissions go on meanwhile), once."""
    worker = batch_worker(engine)

    def wait() -> None:
        deadline = time.monotonic() + 60
        while worker.waiting + len(worker.loop.requests) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.loop.before_decode = None

    worker.loop.before_decode = wait


def test_llm_batch_and_abatch_decode_the_prompts_together(make_tiny_engine, sizes):
    engine = make_tiny_engine()
    engine.eos_token_ids = frozenset()  # every answer runs to max_tokens: they overlap in the batch
    llm = CacheBlendLLM(engine=engine, max_tokens=10)
    alone = [llm.invoke(p) for p in PROMPTS]
    assert sizes == []  # one prompt per call: the one-request path
    assert llm.batch(PROMPTS) == alone
    assert max(sizes) == len(PROMPTS)
    assert asyncio.run(llm.abatch(PROMPTS)) == alone
    result = llm.generate(PROMPTS)
    assert [g[0].generation_info["usage_metadata"]["output_tokens"] for g in result.generations] == [10] * 3
    assert result.llm_output["token_usage"]["output_tokens"] == 30


def test_chat_batch_and_abatch_share_the_engines_batch(make_tiny_engine, sizes):
    engine = make_tiny_engine()
    engine.eos_token_ids = frozenset()
    chat = ChatCacheBlend(engine=engine, max_tokens=8)
    inputs = [[HumanMessage(p)] for p in PROMPTS]
    alone = [chat.invoke(i) for i in inputs]
    assert sizes == []
    hold_until_all_submitted(engine, len(inputs))
    batched = chat.batch(inputs)
    assert [m.content for m in batched] == [m.content for m in alone]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in alone]
    assert max(sizes) >= 2
    sizes.clear()
    hold_until_all_submitted(engine, len(inputs))
    abatched = asyncio.run(chat.abatch(inputs))
    assert [m.content for m in abatched] == [m.content for m in alone] and max(sizes) >= 2
    assert engine.metrics()["abandoned_requests"] == 0


def test_llm_batch_timeout_stops_every_prompt(make_tiny_engine):
    engine = make_tiny_engine()
    engine.eos_token_ids = frozenset()
    llm = CacheBlendLLM(engine=engine, max_tokens=200, timeout=1e-6)
    with pytest.raises(TimeoutError, match="batch of requests exceeded timeout"):
        llm.batch(PROMPTS)
    counts = engine.metrics()  # stopped after the first piece: the prompts still prefilling are not counted
    assert counts["abandoned_requests"] >= 1 and counts["requests"] == counts["abandoned_requests"]
    assert counts["generated_tokens"] < 10
