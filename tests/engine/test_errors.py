"""Bad input gets a clear error naming the problem and the fix."""

import pytest

from cacheblend_rag import BlendConfig, ChunkHandle
from tests.conftest import PASSAGES, config


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=0)


def test_empty_prompt(engine):
    for bad in ([], [""], ""):
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.generate(bad) if bad != "" else engine.generate(prompt=bad)


def test_prompt_longer_than_context_window(engine):
    with pytest.raises(ValueError, match="context window is 2048"):
        engine.generate(["word " * 2100])


def test_unknown_and_foreign_handles(engine, make_engine):
    other = make_engine("llama", seed=1)
    (foreign,) = other.precompute([PASSAGES[0]])
    with pytest.raises(ValueError, match=r"unknown handle.*another model"):
        engine.generate(["Q", foreign])
    (mine,) = engine.precompute([PASSAGES[0]])
    forged = ChunkHandle("0" * 64, mine.text, mine.token_ids, mine.model_fingerprint)
    with pytest.raises(ValueError, match=r"unknown handle.*does not match"):
        engine.generate(["Q", forged])
    with pytest.raises(TypeError, match="segment 1 is a dict"):
        engine.generate(["Q", {"key": mine.key}])


def test_handle_evicted_from_store_is_recomputed(engine):
    (handle,) = engine.precompute([PASSAGES[0]])
    engine.store.delete(handle.key)
    result = engine.generate(["Q ", handle, " A"], max_new_tokens=2, config=config("cacheblend"))
    assert result.stats.cache_misses == 1 and engine.store.contains(handle.key)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recompute_ratio": 1.5}, r"recompute_ratio must be a number in \[0, 1\], got 1.5"),
        ({"recompute_ratio": -0.1}, "recompute_ratio"),
        ({"strategy": "magic"}, "strategy must be one of full_recompute, prefix_cache, full_reuse, cacheblend"),
        ({"check_layers": (0,)}, "check_layers must be >= 1"),
        ({"check_layers": (2, 1)}, "strictly increasing"),
        (
            {"selection": "deviation", "check_layers": (1, 2), "check_ratios": (0.1, 0.2), "recompute_ratio": 0.2},
            "must not increase",
        ),
        ({"selection": "deviation", "check_layers": (1, 2), "check_ratios": (0.3,)}, "one ratio per check layer"),
        ({"selection": "attention", "check_ratios": (0.3,)}, "the last check ratio is the recompute ratio"),
        ({"deviation": "q"}, "deviation must be .v. or .k."),
        ({"selection": "oracle"}, "selection must be one of query, bridge, deviation, attention"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"recompute_chunk_head": -1}, "recompute_chunk_head"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlendConfig(**kwargs)


def test_check_layer_beyond_the_model(engine):
    with pytest.raises(ValueError, match="do not exist: the model has 4 layers"):
        engine.generate(["hello"], config=BlendConfig(selection="deviation", check_layers=(1, 9)))


def test_bad_generation_arguments(engine):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the triton error is only raised where CUDA is missing")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="stop must be"):
        engine.generate(["hi"], stop=[""])
    with pytest.raises(ValueError, match="exactly one of segments, prompt"):
        engine.generate(["hi"], prompt="hi")
    with pytest.raises(TypeError, match="config must be a BlendConfig"):
        engine.generate(["hi"], config={"strategy": "cacheblend"})
    with pytest.raises(TypeError, match="list of texts"):
        engine.precompute("one text")
    with pytest.raises(ValueError, match="empty text"):
        engine.precompute([""])
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        engine.generate(["hi"], config=BlendConfig(backend="triton"))


# ---- absurd sizes and sampling options: a cache no larger than the context window, bad values named -----------
def test_huge_max_new_tokens_sizes_the_cache_to_the_context_window(engine, monkeypatch):
    capacities = []
    new_cache = engine._new_cache

    def recording(capacity):
        capacities.append(capacity)
        return new_cache(capacity)

    monkeypatch.setattr(engine, "_new_cache", recording)
    engine.eos_token_ids = frozenset(range(engine.model_forward.vocab_size))  # ends at once: only the sizing matters
    result = engine.generate(["Hello there"], max_new_tokens=10**9)
    assert result.finish_reason == "eos" and max(capacities) <= engine.context_window + 1
    stream = engine.stream(["Hello there"], max_new_tokens=10**12)
    assert list(stream) == [] and max(capacities) <= engine.context_window + 1


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
        ({"top_p": float("nan")}, ValueError, "top_p must be in"),
        ({"seed": "x"}, ValueError, r"seed must be an int \(or None for an unseeded sampler\), got 'x'"),
        ({"seed": 1.5}, ValueError, "seed must be an int"),
        ({"seed": 2**70}, ValueError, "seed must be an int"),
        ({"stop": 5}, ValueError, "stop must be a non-empty string or a list of non-empty strings, got 5"),
        ({"stop": [5]}, ValueError, "stop must be"),
        ({"stop": {"a": 1}}, ValueError, "stop must be"),
    ],
)
def test_bad_sampling_arguments_name_the_value(engine, kwargs, error, message):
    with pytest.raises(error, match=message):
        engine.generate(["hi"], max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("segments", [{"Q": 1, "A": 2}, {"Q", "A"}, 5])
def test_segments_must_be_an_ordered_list(engine, segments):
    with pytest.raises(TypeError, match=r"segments must be a list of str \(computed\) and ChunkHandle"):
        engine.generate(segments, max_new_tokens=2)
    assert engine.generate(("Q", " A"), max_new_tokens=1).stats.prompt_tokens > 1  # a tuple is fine


def test_chunk_longer_than_the_context_window_is_refused_before_computing(engine):
    text = "word " * 2100
    room = 2048 - len(engine.chunk_prefix_ids)  # the chunk prefix takes part of the window
    message = rf"texts\[1\] has 210\d tokens, more than a chunk can have in the model's context window \({room} "
    message += r"of 2048\)"
    with pytest.raises(ValueError, match=message + "; split it"):
        engine.precompute([PASSAGES[0], text])
    assert engine.metrics()["precomputed_chunks"] == 0 and len(engine.registry) == 0


def test_register_checks_that_a_handle_text_matches_its_tokens(engine):
    (handle,) = engine.precompute([PASSAGES[0]], register=False)
    forged = ChunkHandle(handle.key, PASSAGES[1], handle.token_ids, handle.model_fingerprint)
    with pytest.raises(ValueError, match="its text does not tokenize to its token ids"):
        engine.register([handle, forged])
    assert len(engine.registry) == 0  # all or nothing
    engine.register([handle])
    assert engine.registry.lookup(PASSAGES[0]) == handle
