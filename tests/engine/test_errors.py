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
        ({"check_layers": (1, 2), "check_ratios": (0.1, 0.2), "recompute_ratio": 0.2}, "must not increase"),
        ({"check_layers": (1, 2), "check_ratios": (0.3,)}, "one ratio per check layer"),
        ({"deviation": "q"}, "deviation must be .v. or .k."),
        ({"selection": "oracle"}, "selection must be one of deviation, attention"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"recompute_chunk_head": -1}, "recompute_chunk_head"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlendConfig(**kwargs)


def test_check_layer_beyond_the_model(engine):
    with pytest.raises(ValueError, match="do not exist: the model has 4 layers"):
        engine.generate(["hello"], config=BlendConfig(check_layers=(1, 9)))


def test_bad_generation_arguments(engine):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the triton error is only raised where CUDA is missing")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="stop must be"):
        engine.generate(["hi"], stop=[""])
    with pytest.raises(ValueError, match="either segments or prompt"):
        engine.generate(["hi"], prompt="hi")
    with pytest.raises(TypeError, match="config must be a BlendConfig"):
        engine.generate(["hi"], config={"strategy": "cacheblend"})
    with pytest.raises(TypeError, match="list of texts"):
        engine.precompute("one text")
    with pytest.raises(ValueError, match="empty text"):
        engine.precompute([""])
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        engine.generate(["hi"], config=BlendConfig(backend="triton"))
