"""Generation: streaming, stop strings, sampling, prompt splitting, chat template, threads."""

import threading

import pytest
import torch

from cacheblend_rag import BlendConfig, GenerationResult, SamplingParams
from cacheblend_rag.engine.sampling import Sampler
from cacheblend_rag.engine.text_stream import TextStreamer
from tests.conftest import PASSAGES, config


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=11)


def test_stream_pieces_join_to_the_result(engine):
    segments = ["Read.\n", *engine.precompute(PASSAGES), "\nSay something."]
    stream = engine.stream(segments, max_new_tokens=20)
    pieces = list(stream)
    result = stream.result
    assert isinstance(result, GenerationResult)
    assert len(pieces) > 1 and "".join(pieces) == result.text
    assert result.text == engine.generate(segments, max_new_tokens=20).text
    assert result.stats.new_tokens == len(result.token_ids) and result.ttft_s > 0


def test_stop_string_cuts_text(engine):
    segments = ["Read.\n", *engine.precompute(PASSAGES), "\nSay something."]
    full = engine.generate(segments, max_new_tokens=20)
    stop = full.text[5:8]
    assert stop and stop in full.text
    cut = engine.generate(segments, max_new_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(engine.stream(segments, max_new_tokens=20, stop=stop))
    assert streamed == cut.text


def test_streamer_holds_back_partial_stop(tokenizer):
    streamer = TextStreamer(tokenizer, ("\nQuestion",))
    out = "".join(streamer.push(t) for t in tokenizer.encode("Paris\nQuest", add_special_tokens=False))
    assert out == "Paris"
    rest = "".join(streamer.push(t) for t in tokenizer.encode("ion: more", add_special_tokens=False))
    assert rest == "" and streamer.done and streamer.text == "Paris"


def test_eos_ends_generation(engine):
    engine.eos_token_ids = frozenset(range(engine.model_forward.vocab_size))
    result = engine.generate(["Hello"], max_new_tokens=10)
    assert result.finish_reason == "eos" and result.token_ids == [] and result.text == ""


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate(["Once upon a time"], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    b = engine.generate(["Once upon a time"], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_prompt_is_split_at_registered_chunks_in_any_order(engine):
    handles = engine.precompute(PASSAGES)
    order = [handles[2], handles[0], handles[1]]
    segments = ["<context>\n", order[0], "\n\n", order[1], "\n\n", order[2], "\n</context>\nQ: rivers?"]
    prompt = "".join(s if isinstance(s, str) else s.text for s in segments)
    assert [b.handle for b in engine.blocks(None, prompt) if b.handle is not None] == order
    by_prompt = engine.generate(prompt=prompt, max_new_tokens=8, config=config("cacheblend"))
    # the prompt keeps its own tokens (here "\n\n" between chunks is two "\n" tokens, one when tokenized alone)
    assert by_prompt.prompt_token_ids == engine.bos_ids + engine.tokenize(prompt)
    assert by_prompt.stats.cached_tokens == sum(h.n_tokens for h in handles) and by_prompt.stats.cache_hits == 3
    as_segments = [*engine.registry.split(engine.tokenize(prompt))]
    as_segments = [engine.tokenizer.decode(s) if isinstance(s, list) else s for s in as_segments]
    assert [s for s in as_segments if not isinstance(s, str)] == order and "".join(
        s if isinstance(s, str) else s.text for s in as_segments
    ) == prompt


def test_unregistered_text_is_simply_computed(engine):
    engine.precompute(PASSAGES[:1])
    result = engine.generate(prompt="Nothing cached here. " + PASSAGES[1][:-3], max_new_tokens=4)
    assert result.stats.cached_tokens == 0 and result.stats.reused_tokens == 0


def test_chat_segments_keep_chunk_texts(engine):
    handles = engine.precompute(PASSAGES[:2])
    segments = engine.chat_segments(["Passages:\n", handles[0], handles[1], "\nQ?"], system="Be brief.")
    assert segments[2] is handles[0] and segments[3] is handles[1]
    assert segments[0].startswith("<|im_start|>system\nBe brief.") and segments[-1].endswith("assistant\n")
    prompt = "".join(s if isinstance(s, str) else s.text for s in segments)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Passages:\n" + PASSAGES[0] + PASSAGES[1] + "\nQ?"},
    ]
    assert prompt == engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_threads_get_the_same_results_as_alone(engine):
    handles = engine.precompute(PASSAGES)
    requests = [
        (["Read.\n", *handles[i:], f"\nQ{i}?"], BlendConfig(strategy=s))
        for i in range(3)
        for s in ("cacheblend", "full_reuse", "prefix_cache", "full_recompute")
    ]
    alone = [engine.generate(segs, max_new_tokens=6, config=cfg).token_ids for segs, cfg in requests]
    results: dict[int, list[int]] = {}
    errors = []

    def work(i):
        try:
            segs, cfg = requests[i]
            results[i] = engine.generate(segs, max_new_tokens=6, config=cfg).token_ids
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(requests))] == alone


def test_metrics_accumulate(engine):
    handles = engine.precompute(PASSAGES)
    engine.precompute(PASSAGES)
    engine.generate(["Read.\n", *handles, "\nQ?"], max_new_tokens=3, config=config("cacheblend"))
    m = engine.metrics()
    assert m["requests"] == 1 and m["precomputed_chunks"] == 3 and m["precompute_cache_hits"] == 3
    assert m["cache_hits"] == 3 and m["reused_tokens"] > 0 and m["store"]["memory"]["hits"] == 3


def test_closed_stream_still_counts(engine):
    handles = engine.precompute(PASSAGES)
    stream = engine.stream(["Read.\n", *handles, "\nSay something."], max_new_tokens=20)
    first = next(stream)
    assert first
    stream.close()
    m = engine.metrics()
    assert m["requests"] == 1 and m["abandoned_requests"] == 1 and m["generated_tokens"] >= 1
    assert m["reused_tokens"] > 0
    with pytest.raises(StopIteration):
        next(stream)


def test_miss_path_computations_are_counted(engine):
    (handle,) = engine.precompute(PASSAGES[:1])
    engine.store.delete(handle.key)
    engine.generate(["Q ", handle, "\nA:"], max_new_tokens=1, config=config("full_reuse"))
    assert engine.metrics()["computed_on_miss"] == 1


def test_sampling_params_and_keywords_are_one_set_of_options(engine):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, stop="zzz")
    assert params.stop == ("zzz",) and SamplingParams(stop=None).stop == ()
    by_params = engine.generate(["Once upon a time"], sampling=params)
    by_keywords = engine.generate(
        ["Once upon a time"], max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, stop="zzz"
    )
    assert by_params.token_ids == by_keywords.token_ids and 1 <= len(by_params.token_ids) <= 6
    shorter = engine.generate(["Once upon a time"], sampling=params, max_new_tokens=2)  # keywords override
    assert shorter.token_ids == by_params.token_ids[:2]
    with pytest.raises(TypeError, match=r"unknown sampling option\(s\) \['max_tokens'\]; the options are max_new_tok"):
        engine.generate(["hi"], max_tokens=3)
    with pytest.raises(TypeError, match="sampling must be a SamplingParams, got dict"):
        engine.generate(["hi"], sampling={"max_new_tokens": 3})


def test_a_finished_stream_lets_go_of_its_kv_cache(engine):
    """The stream object may outlive its generation (a server keeps it for its result): the request's KV cache
    (and on CUDA the decode graph's memory pool) must be freed when decoding ends, not when the stream is."""
    import gc
    import weakref

    handles = engine.precompute(PASSAGES)
    for close_early in (False, True):
        stream = engine.stream(["Read.\n", *handles, "\nSay something."], max_new_tokens=12)
        cache = weakref.ref(stream._request.cache.k)
        if close_early:
            next(stream)
            stream.close()
        else:
            assert stream.result.token_ids
        gc.collect()
        assert cache() is None, "the finished stream still holds its KV cache"


@pytest.mark.parametrize("options", [{"temperature": 1e-40}, {"temperature": 0.7, "top_p": 1e-300}])
def test_a_vanishing_temperature_or_nucleus_is_greedy(options):
    """Dividing logits by a temperature of 1e-40 overflows to inf and softmax then gives NaN; such a distribution is
    its top token, so the sampler decodes greedily instead of failing."""
    logits = torch.tensor([30.0, -5.0, 29.0, 1.0])
    sampler = Sampler(SamplingParams(seed=0, **options))
    assert [sampler(logits) for _ in range(5)] == [0] * 5
