"""Batched decoding (engine/running_batch.py, batch_step.py, kv_slots.py) gives what one-at-a-time decoding gives.

The reference is ``engine.generate`` (a GenerationStream decoding one request on its own cache); the batch gets
the same prefills (``engine.prepare``) and must produce the same tokens, text and finish reason in float32, with
sequences of different prompt lengths, with and without reused chunks, joining and leaving between steps, and
one cancelled mid-batch. In bf16 the logits of every step stay within the bf16 tolerance of the other tests.
"""

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag import SamplingParams
from cacheblend_rag.engine.batch_step import BatchStepper, batch_step, buckets, padded_inputs
from cacheblend_rag.engine.decode import decode_step
from cacheblend_rag.engine.kv_slots import KVSlots
from cacheblend_rag.engine.running_batch import RunningBatch
from cacheblend_rag.engine.sampling import Sampler
from cacheblend_rag.engine.text_stream import TextStreamer
from tests.conftest import PASSAGES, config, tiny_model

CUDA = torch.cuda.is_available()
BLEND = config("cacheblend", recompute_ratio=0.3)


def requests(engine) -> list[tuple[list, object, SamplingParams]]:
    """(segments, config, sampling) of five requests: prompts of 3 to ~90 tokens, reused chunks or not."""
    handles = engine.precompute(PASSAGES)
    return [
        (["Read.\n", *handles, "\nSay something about the rivers."], BLEND, SamplingParams(max_new_tokens=20)),
        (["Hello there"], config("full_recompute"), SamplingParams(max_new_tokens=9)),
        ([PASSAGES[1], "\nWhat is tall?"], config("full_recompute"), SamplingParams(max_new_tokens=16)),
        (["Intro:\n", handles[2], handles[0], "\nQ: which?"], config("cacheblend"), SamplingParams(max_new_tokens=24)),
        (["Facts: ", handles[1], "\nMore."], config("full_reuse"), SamplingParams(max_new_tokens=12)),
    ]


def join(batch: RunningBatch, engine, segments, cfg, sampling: SamplingParams):
    """Prefill a request through the engine and add it to the batch (what GenerationStream gets, batched)."""
    request = engine.prepare(segments, config=cfg)
    return batch.add(
        request.cache,
        request.logits,
        Sampler(sampling),
        TextStreamer(engine.tokenizer, sampling.stop),
        sampling.max_new_tokens,
        engine.eos_token_ids,
    )


def drain(batch: RunningBatch, pieces: dict, steps: int | None = None) -> None:
    """Step ``steps`` times (None: until the batch is empty), collecting each sequence's text pieces."""
    n = 0
    while len(batch) and (steps is None or n < steps):
        for seq, piece in batch.step():
            pieces.setdefault(id(seq), []).append(piece)
        n += 1


def assert_same(seq, pieces: dict, expected) -> None:
    assert seq.tokens == expected.token_ids
    assert seq.finish_reason == expected.finish_reason
    assert seq.text == expected.text == "".join(pieces.get(id(seq), []))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_batch_decodes_what_each_request_decodes_alone(make_engine, arch):
    engine = make_engine(arch, seed=11)
    reqs = requests(engine)
    expected = [engine.generate(s, config=c, sampling=p) for s, c, p in reqs]
    batch = RunningBatch(engine.model_forward, slots=8, capacity=160)
    seqs = [join(batch, engine, s, c, p) for s, c, p in reqs]
    pieces: dict = {}
    drain(batch, pieces)
    assert len({len(engine.prepare(s, config=c).prompt_ids) for s, c, _ in reqs}) == len(reqs)  # all lengths differ
    for seq, want in zip(seqs, expected, strict=True):
        assert_same(seq, pieces, want)
    assert len(batch) == 0 and batch.slots.count == 0


def test_sequences_join_and_leave_between_steps_and_one_is_cancelled(make_engine):
    engine = make_engine("llama", seed=11)
    reqs = requests(engine)
    expected = [engine.generate(s, config=c, sampling=p) for s, c, p in reqs]
    batch = RunningBatch(engine.model_forward, slots=4, capacity=160)
    pieces: dict = {}
    seqs = [join(batch, engine, *reqs[0]), join(batch, engine, *reqs[1])]
    drain(batch, pieces, steps=3)
    seqs.append(join(batch, engine, *reqs[2]))
    drain(batch, pieces, steps=2)
    batch.cancel(seqs[0])  # slot 0 leaves mid-batch: the last sequence moves into it
    assert seqs[0].finish_reason == "cancelled" and len(batch) == 2
    seqs.append(join(batch, engine, *reqs[3]))
    drain(batch, pieces, steps=7)  # request 1 (9 tokens) finishes in here and leaves
    assert seqs[1].done and len(batch) == 2
    seqs.append(join(batch, engine, *reqs[4]))
    drain(batch, pieces)
    cancelled = seqs[0]
    assert cancelled.tokens == expected[0].token_ids[: len(cancelled.tokens)] and len(cancelled.tokens) == 5
    for seq, want in zip(seqs[1:], expected[1:], strict=True):
        assert_same(seq, pieces, want)
    batch.cancel(seqs[1])  # a finished sequence stays as it ended
    assert seqs[1].finish_reason == expected[1].finish_reason


def test_stop_strings_eos_and_seeded_sampling_stay_per_sequence(make_engine):
    engine = make_engine("llama", seed=11)
    reqs = requests(engine)
    plain = engine.generate(reqs[0][0], config=reqs[0][1], max_new_tokens=20)
    stop = plain.text[6:9]
    assert stop and stop in plain.text
    eos = engine.generate(reqs[2][0], config=reqs[2][1], max_new_tokens=16).token_ids[4]
    samplings = [
        SamplingParams(max_new_tokens=20, stop=stop),
        SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=16),
        SamplingParams(max_new_tokens=10, temperature=1.2, seed=8),
    ]
    engine.eos_token_ids = frozenset({eos})  # ends request 2 early, alone and in the batch
    cases = [(reqs[i][0], reqs[i][1], p) for i, p in zip((0, 1, 2, 3), samplings, strict=True)]
    expected = [engine.generate(s, config=c, sampling=p) for s, c, p in cases]
    assert expected[0].finish_reason == "stop" and expected[2].finish_reason == "eos"
    batch = RunningBatch(engine.model_forward, slots=4, capacity=160)
    seqs = [join(batch, engine, *case) for case in cases]
    pieces: dict = {}
    drain(batch, pieces)
    for seq, want in zip(seqs, expected, strict=True):
        assert_same(seq, pieces, want)


def test_batch_step_logits_equal_one_sequence_steps(make_engine):
    """Teacher-forced: the same tokens fed to the batch and to each sequence's own decode_step give the same
    logits at every step (float32: to rounding)."""
    check_teacher_forced(make_engine("llama", seed=11), atol=1e-5, rtol=1e-5)


def test_bf16_batch_step_logits_within_the_bf16_tolerance(make_engine):
    engine = make_engine(model=tiny_model("llama", seed=5).to(torch.bfloat16), store_dtype=torch.bfloat16)
    check_teacher_forced(engine, atol=0.05, rtol=0.05)  # test_forward.py's bf16 tolerance against Hugging Face


def check_teacher_forced(engine, atol: float, rtol: float) -> None:
    reqs = requests(engine)
    prepared = [engine.prepare(s, config=c, extra_capacity=12) for s, c, _ in reqs]
    slots = KVSlots.for_model(engine.model_forward, slots=len(reqs), capacity=128)
    for request in prepared:
        slots.add(request.cache, room=12)
    stepper = BatchStepper(engine.model_forward, slots)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        tokens = torch.randint(0, engine.model_forward.vocab_size, (len(reqs),), generator=gen).tolist()
        with torch.inference_mode():
            batched = stepper(tokens)
            alone = torch.stack([decode_step(r.fwd, r.cache, t) for r, t in zip(prepared, tokens, strict=True)])
        assert_close(batched, alone, atol=atol, rtol=rtol)
    assert slots.lengths == [r.cache.length for r in prepared]


def test_slots_stay_compact_and_keep_each_sequence_rows(make_engine):
    engine = make_engine("llama", seed=11)
    caches = [engine.prepare([text]).cache for text in ("One two three", PASSAGES[0], "Four", PASSAGES[2])]
    slots = KVSlots.for_model(engine.model_forward, slots=4, capacity=64)
    for cache in caches:
        slots.add(cache)
    assert slots.remove(1) == 3 and slots.lengths == [caches[0].length, caches[3].length, caches[2].length]
    assert slots.remove(2) is None and slots.count == 2
    for slot, cache in ((0, caches[0]), (1, caches[3])):
        view = slots.cache(slot)
        assert view.length == cache.length
        assert torch.equal(view.k[:, :, : cache.length], cache.k[:, :, : cache.length])
        assert torch.equal(view.v[:, :, : cache.length], cache.v[:, :, : cache.length])
    with pytest.raises(IndexError, match="not occupied"):
        slots.cache(2)


def test_a_sequence_that_does_not_fit_is_refused_with_the_fix(make_engine):
    engine = make_engine("llama", seed=11)
    request = engine.prepare([PASSAGES[0]])
    batch = RunningBatch(engine.model_forward, slots=1, capacity=request.cache.length + 4)
    args = (request.logits, Sampler(SamplingParams()), TextStreamer(engine.tokenizer, ()))
    assert not batch.fits(request.cache.length, 6) and batch.fits(request.cache.length, 5)
    with pytest.raises(ValueError, match="lower its max_new_tokens"):
        batch.add(request.cache, *args, 6, engine.eos_token_ids)
    batch.add(request.cache, *args, 5, engine.eos_token_ids)
    assert not batch.fits(1, 1)
    with pytest.raises(RuntimeError, match="KV slots are taken"):
        batch.add(request.cache, *args, 5, engine.eos_token_ids)


def test_a_padded_batch_as_a_graph_runs_it_changes_only_its_rows_and_scratch(make_engine):
    """What a CUDA graph of a bucket computes, run eagerly on the CPU: 3 sequences padded to 8 rows, positions only on
    the device (no host length: the masked attention over every row of a slot). The real rows get the logits and
    K/V of the unpadded step; the free slots, which a prefill may be filling, are left as they were."""
    engine = make_engine("llama", seed=11)
    caches = [engine.prepare([text]).cache for text in ("One two three", PASSAGES[0], PASSAGES[2])]
    slots, padded = (KVSlots.for_model(engine.model_forward, slots=8, capacity=96) for _ in range(2))
    for pool in (slots, padded):
        for cache in caches:
            pool.add(cache)
        pool.k[3:8].normal_(generator=torch.Generator().manual_seed(1))  # free slots: someone else's rows
        pool.v[3:8].normal_(generator=torch.Generator().manual_seed(2))
    free_k, free_v = padded.k[3:8].clone(), padded.v[3:8].clone()
    tokens, pos = [5, 17, 400], slots.lengths[:3]
    with torch.inference_mode():
        want = BatchStepper(engine.model_forward, slots)(tokens)
        inputs = padded_inputs(tokens, pos, 8, padded.scratch)
        got = batch_step(engine.model_forward, padded, inputs[0], inputs[1], write=inputs[2])
    assert_close(got[:3], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded.k[3:8], free_k) and torch.equal(padded.v[3:8], free_v)
    for i, n in enumerate(pos):
        assert_close(padded.k[i, :, :, : n + 1], slots.k[i, :, :, : n + 1], atol=1e-6, rtol=1e-6)
        assert_close(padded.v[i, :, :, : n + 1], slots.v[i, :, :, : n + 1], atol=1e-6, rtol=1e-6)


def test_graph_buckets_cover_every_batch_size():
    assert buckets(1) == [1] and buckets(16) == [1, 2, 4, 8, 16] and buckets(12) == [1, 2, 4, 8, 12]


@pytest.mark.skipif(not CUDA, reason="needs CUDA: CUDA graphs")
def test_graph_batches_equal_eager_batches(make_engine):
    """One CUDA graph per batch-size bucket (1, 2, 4) replays what the eager step computes, as sequences join and
    leave (the batch size crosses buckets both ways)."""
    results = []
    for graphs in (True, False):
        engine = make_engine("llama", model=tiny_model("llama", seed=11).to("cuda"))
        reqs = requests(engine)
        batch = RunningBatch(engine.model_forward, slots=4, capacity=160, graphs=graphs)
        pieces: dict = {}
        seqs = [join(batch, engine, *reqs[0])]
        drain(batch, pieces, steps=2)
        seqs += [join(batch, engine, *req) for req in reqs[1:4]]
        drain(batch, pieces)
        results.append([(s.tokens, s.finish_reason) for s in seqs])
        if graphs:
            assert batch.stepper.use_graphs and set(batch.stepper.graphs) >= {1, 2, 4}, "capture failed (see the log)"
            assert batch.stepper.graph_steps > 0
    assert results[0] == results[1]
