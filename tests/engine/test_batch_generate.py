"""Batched generation (engine/batch_generate.py, batch_loop.py, decode_pool.py, batch_request.py) gives what
``engine.generate`` gives one request at a time, in float32: the same tokens, text, finish reason and usage, with
prompts of several lengths, reused chunks or not, a pool too small for all of them at once, and a pool made again
larger while sequences decode. The loop's own rules (chunked prefill interleaved with decoding, short prefills
overtaking a long one, admission by KV memory, stopping) are checked on the order of its events, never on time.
"""

import pytest

from cacheblend_rag import SamplingParams
from cacheblend_rag.engine.batch_loop import BatchLoop, kv_budget
from cacheblend_rag.engine.batch_request import BatchRequest
from cacheblend_rag.engine.decode_pool import MIN_CAPACITY, DecodePool
from cacheblend_rag.engine.kv_slots import KVSlots
from tests.conftest import PASSAGES, config

BLEND = config("cacheblend", recompute_ratio=0.3)


def specs(engine) -> list[dict]:
    """Five requests: prompts of 3 to ~90 tokens, reused chunks or not, different lengths and stops."""
    handles = engine.precompute(PASSAGES)
    return [
        {"segments": ["Read.\n", *handles, "\nSay something about the rivers."], "config": BLEND},
        {"prompt": "Hello there", "sampling": SamplingParams(max_new_tokens=9), "config": config("full_recompute")},
        {"segments": [PASSAGES[1], "\nWhat is tall?"], "sampling": SamplingParams(max_new_tokens=16)},
        {"segments": ["Intro:\n", handles[2], handles[0], "\nQ: which?"], "config": config("cacheblend")},
        {"messages": [{"role": "user", "content": "Facts about " + PASSAGES[0]}], "config": config("full_reuse")},
    ]


def alone(engine, spec: dict, sampling: SamplingParams):
    spec = {"sampling": sampling, **spec}
    return engine.generate(spec.pop("segments", None), **spec)


def same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert got.stats.new_tokens == want.stats.new_tokens and got.stats.prompt_tokens == want.stats.prompt_tokens
    # the prompt's head is read exact from the store once a request stored it, so who stored it may differ
    assert got.stats.reused_tokens - got.stats.head_tokens == want.stats.reused_tokens - want.stats.head_tokens
    assert got.prompt_token_ids == want.prompt_token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_batch_gives_what_generate_gives_one_at_a_time(make_engine, arch):
    engine = make_engine(arch, seed=11)
    reqs = specs(engine)
    default = SamplingParams(max_new_tokens=20)
    expected = [alone(engine, spec, default) for spec in reqs]
    before = engine.metrics()
    results = engine.generate_batch(reqs, sampling=default)
    after = engine.metrics()
    for got, want in zip(results, expected, strict=True):
        same(got, want)
    assert after["requests"] - before["requests"] == len(reqs)
    assert after["generated_tokens"] - before["generated_tokens"] == sum(len(r.token_ids) for r in expected)
    assert after["abandoned_requests"] == before["abandoned_requests"]
    assert all(r.stats.ttft_s > 0 and r.stats.decode_s > 0 and r.stats.prefill_s > 0 for r in results)


def test_a_small_pool_admits_by_kv_memory_and_is_made_larger_while_decoding(make_engine):
    engine = make_engine("llama", seed=3)
    row = KVSlots.slot_bytes(engine.model_forward, 1)
    short = {"prompt": "Hi", "sampling": SamplingParams(max_new_tokens=40)}
    longer = {"prompt": "Tell me more. " * 30, "sampling": SamplingParams(max_new_tokens=250)}  # > MIN_CAPACITY rows
    reqs = [short, short | {"prompt": "Hello"}, longer, short | {"prompt": "Bye"}]
    expected = [alone(engine, dict(spec), spec["sampling"]) for spec in reqs]
    small = 5 * MIN_CAPACITY * row  # 4 short slots + scratch, or 1 long slot + scratch (2 x 512 rows)
    for got, want in zip(engine.generate_batch(reqs, kv_memory=small, max_batch=8), expected, strict=True):
        same(got, want)  # the long one waited for the pool to empty
    loop = BatchLoop(engine, kv_memory=small, max_batch=8)
    made = [BatchRequest(engine, **spec) for spec in reqs]
    assert loop.pool.slots_for(MIN_CAPACITY) == 4 and loop.pool.slots_for(2 * MIN_CAPACITY) == 1
    assert loop.pool.fits(made[0].rows, [made[1].rows]) and not loop.pool.fits(made[2].rows, [made[0].rows])

    loop = BatchLoop(engine, kv_memory=12 * MIN_CAPACITY * row, max_batch=8)  # 5 slots of 512 rows
    for request in made[:2]:
        loop.admit(request)
        while request.seq is None:
            loop.step()
    loop.step()
    assert loop.pool.capacity == MIN_CAPACITY and len(made[0].seq.tokens) >= 2
    loop.admit(made[2])
    while made[2].seq is None:
        loop.step()
    assert loop.pool.capacity == 2 * MIN_CAPACITY and loop.pool.batch.slots.slots == 5  # remade, both copied over
    loop.admit(made[3])
    while loop.busy:
        loop.step()
    for request, want in zip(made, expected, strict=True):
        same(request.result, want)
    assert loop.pool.capacity == 0  # the long sequence's pool went with the last sequence
    again = BatchRequest(engine, **short)
    loop.admit(again)
    while loop.pool.batch is None:
        loop.step()
    assert loop.pool.capacity == MIN_CAPACITY and loop.pool.batch.slots.slots == 8  # every slot of a short pool
    while loop.busy:
        loop.step()
    same(again.result, expected[0])
    with pytest.raises(ValueError, match="kv_memory"):
        engine.generate_batch(["x " * 600], max_new_tokens=600, kv_memory=small)


def test_a_running_batch_gets_a_token_between_every_prefill_step_of_a_long_prompt(make_engine):
    engine = make_engine("llama", seed=5)
    layers = engine.model_forward.n_layers
    loop = BatchLoop(engine, prefill_budget=8 * layers)  # 8 prompt rows through every layer per step
    running = BatchRequest(engine, prompt="Go on", max_new_tokens=60)
    loop.admit(running)
    while running not in loop.pool.requests:
        loop.step()
    long = BatchRequest(engine, prompt="A long story about the sea. " * 12, max_new_tokens=4)
    assert long.work > 4 * loop.prefill_budget and loop.admissible(long)
    loop.admit(long)
    log = []
    while long not in loop.pool.requests:
        events = loop.step()
        log.append(("prefill", long.prefill_work) if long not in events.joined else ("joined",))
        log += [("piece", r is running) for r, _ in events.pieces]
    steps = [e for e in log if e[0] == "prefill"]
    assert len(steps) >= 4 and [w for _, w in steps] == sorted({w for _, w in steps})  # grows step by step
    assert all(log[i + 1] == ("piece", True) for i, e in enumerate(log[:-1]) if e[0] == "prefill")
    loop.stop_all()


def test_a_short_prompt_overtakes_a_long_prefill_every_other_step(make_engine):
    engine = make_engine("llama", seed=5)
    loop = BatchLoop(engine, prefill_budget=8 * engine.model_forward.n_layers)
    long = BatchRequest(engine, prompt="A long story about the sea. " * 12, max_new_tokens=4)
    shorts = [BatchRequest(engine, segments=["Hi"], max_new_tokens=3, config=config("full_recompute")) for _ in "ab"]
    assert loop.is_short(shorts[0]) and not loop.is_short(long)
    loop.admit(long)
    loop.step()  # the long one's first step
    assert loop.admissible(shorts[0])
    loop.admit(shorts[0])
    assert not loop.admissible(shorts[1])  # one short at a time
    work = long.prefill_work
    assert loop.step().joined == [shorts[0]] and long.prefill_work == work  # the short one took this step
    assert not loop.admissible(shorts[1])  # the long one's turn now: its share
    loop.step()
    assert long.prefill_work > work and loop.admissible(shorts[1])
    loop.stop_all()


def test_stopping_drops_a_request_at_the_next_step_and_counts_it_abandoned(make_engine):
    engine = make_engine("llama", seed=5)
    want = engine.generate(prompt="Keep going", max_new_tokens=30)
    loop = BatchLoop(engine)
    stays, leaves = (BatchRequest(engine, prompt=p, max_new_tokens=30) for p in ("Keep going", "Stop soon"))
    loop.admit(stays)
    loop.step()
    loop.admit(leaves)
    for _ in range(4):
        loop.step()
    before = engine.metrics()["abandoned_requests"]
    leaves.stop()
    assert loop.step().stopped == [leaves] and leaves.ended and leaves.seq.finish_reason == "cancelled"
    assert engine.metrics()["abandoned_requests"] == before + 1
    with pytest.raises(RuntimeError, match="stopped"):
        _ = leaves.result
    while loop.busy:
        loop.step()
    same(stays.result, want)


def test_bad_budgets_are_refused(make_engine):
    engine = make_engine("llama")
    with pytest.raises(ValueError, match="prefill_budget"):
        BatchLoop(engine, prefill_budget=0)
    with pytest.raises(ValueError, match="kv_memory"):
        kv_budget(1.5, engine.device)
    with pytest.raises(ValueError, match="max_batch"):
        DecodePool(engine.model_forward, 0, 1 << 20)
    assert kv_budget(0.5, engine.device) > kv_budget(1000, engine.device) == 1000
