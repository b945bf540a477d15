"""Finding registered chunks in a prompt string never changes how the prompt is tokenized."""

import pytest

from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.engine.registry import MIN_TOKENS, ChunkRegistry
from tests.conftest import PASSAGES, config


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=3)


def expected_ids(engine, prompt: str) -> list[int]:
    return engine.bos_ids + engine.tokenize(prompt)


@pytest.mark.real_model
def test_short_chunks_do_not_change_a_real_answer(smollm2_engine):
    base = smollm2_engine
    engine = CacheBlendEngine(base.model, base.tokenizer, store=["memory://?max_bytes=100MB"], cache_dir=base.cache_dir)
    prompt = engine.format_chat([{"role": "user", "content": "What is the capital of France?"}])
    before = engine.generate(prompt=prompt, max_new_tokens=8)
    engine.precompute(["a"])
    engine.precompute(["start"])
    after = engine.generate(prompt=prompt, max_new_tokens=8)
    assert after.prompt_token_ids == before.prompt_token_ids == expected_ids(engine, prompt)
    assert after.text == before.text and "Paris" in after.text
    assert after.stats.cached_tokens == 0 and len(engine.registry) == 0


def test_texts_under_min_tokens_are_not_registered(engine):
    short = "Paris is in France."
    assert len(engine.tokenize(short)) < MIN_TOKENS <= len(engine.tokenize(PASSAGES[0]))
    engine.precompute([short, PASSAGES[0]])
    assert engine.registry.lookup(short) is None and engine.registry.lookup(PASSAGES[0]) is not None
    result = engine.generate(prompt=f"Note:\n{short}\nQ?", max_new_tokens=2)
    assert result.stats.cached_tokens == 0
    # explicit segments still reuse a short chunk's KV
    (handle,) = engine.precompute([short])
    assert engine.generate(["Note:\n", handle, "\nQ?"], max_new_tokens=2).stats.cached_tokens == handle.n_tokens


@pytest.mark.parametrize(
    "chunk, prompt",
    [
        ("a", "The capital of France is a city. Fratle and a answer?"),  # inside words and after a space
        ("start", "<|im_start|>user\nstart here<|im_end|>\n<|im_start|>assistant\n"),  # inside special tokens
        ("ance", "France, Lance and dance."),
    ],
)
def test_no_match_inside_words_or_special_tokens(engine, chunk, prompt):
    engine.registry = ChunkRegistry(min_tokens=1)  # even with no minimum length
    (handle,) = engine.precompute([chunk])
    assert engine.registry.lookup(chunk) == handle
    for strategy in ("cacheblend", "full_recompute"):
        result = engine.generate(prompt=prompt, max_new_tokens=2, config=config(strategy))
        assert result.prompt_token_ids == expected_ids(engine, prompt)
    blocks = engine.blocks(None, prompt)
    assert [t for b in blocks for t in b.token_ids] == expected_ids(engine, prompt)
    # where the chunk's tokens do appear in the prompt's own tokens, it is reused, and still nothing changes
    for b in blocks:
        if b.handle is not None:
            assert b.handle == handle and b.token_ids == list(handle.token_ids)


def contains_run(run, ids) -> bool:
    run, ids = list(run), list(ids)
    return any(ids[i : i + len(run)] == run for i in range(len(ids) - len(run) + 1))


@pytest.mark.parametrize(
    "chunk, prompt",
    [
        (PASSAGES[0][11:], "Mega" + PASSAGES[0][11:] + "\nQ?"),  # the chunk starts mid-word
        (PASSAGES[0][:-1], "Read:\n" + PASSAGES[0][:-1] + "quake\nQ?"),  # ... or ends mid-word (" Earthquake")
        (PASSAGES[0], "Context: " + PASSAGES[0] + "\nQ?"),  # the space before it merges with its first word
        (PASSAGES[0], "Read:\n" + PASSAGES[0] + "...\nQ?"),  # its final period merges with what follows
    ],
)
def test_long_chunk_is_reused_only_on_token_boundaries(engine, chunk, prompt):
    (handle,) = engine.precompute([chunk])
    assert chunk in prompt and not contains_run(handle.token_ids, engine.tokenize(prompt))
    result = engine.generate(prompt=prompt, max_new_tokens=2)
    assert result.prompt_token_ids == expected_ids(engine, prompt)
    assert result.stats.cached_tokens == 0
    ok = engine.generate(prompt="Read:\n" + chunk + "\nQ?", max_new_tokens=2)
    assert ok.stats.cached_tokens == handle.n_tokens and ok.stats.cache_hits == 1


def test_a_chunk_whose_tokens_are_in_the_prompt_is_reused_wherever_it_starts(engine):
    (handle,) = engine.precompute([PASSAGES[0]])
    prompt = "As" + PASSAGES[0] + " x"  # "AsThe" is tokenized "As", "The": the chunk's own tokens
    assert contains_run(handle.token_ids, engine.tokenize(prompt))
    result = engine.generate(prompt=prompt, max_new_tokens=2)
    assert result.prompt_token_ids == expected_ids(engine, prompt) and result.stats.cached_tokens == handle.n_tokens


def test_prompt_split_keeps_the_prompt_tokens(engine):
    handles = engine.precompute(PASSAGES)
    prompt = "<context>\n" + "\n\n".join(h.text for h in reversed(handles)) + "\n</context>\nQ: rivers?"
    blocks = engine.blocks(None, prompt)
    assert [b.handle for b in blocks if b.handle is not None] == list(reversed(handles))
    assert [t for b in blocks for t in b.token_ids] == expected_ids(engine, prompt)


def test_registry_prefers_the_longest_match_and_forgets_evicted_texts():
    from cacheblend_rag import ChunkHandle

    def handle(ids):
        return ChunkHandle(f"k{ids}", f"text {ids}", tuple(ids), "fp")

    registry = ChunkRegistry(max_entries=2, min_tokens=2)
    short, long = handle([5, 6]), handle([5, 6, 7, 8])
    assert registry.register(short) and registry.register(long)
    assert not registry.register(handle([9]))
    assert registry.split([1, 5, 6, 7, 8, 5, 6, 9]) == [[1], long, short, [9]]
    registry.register(handle([7, 7]))  # evicts ``long``: ``short`` was found in a prompt after it
    assert registry.lookup(long.text) is None
    assert registry.split([5, 6, 7, 8]) == [short, [7, 8]]
    with pytest.raises(ValueError, match="min_tokens must be an int >= 1"):
        ChunkRegistry(min_tokens=0)


def test_a_match_is_a_use_the_least_recently_used_chunk_is_evicted():
    from cacheblend_rag import ChunkHandle

    def handle(ids):
        return ChunkHandle(f"k{ids}", f"text {ids}", tuple(ids), "fp")

    registry = ChunkRegistry(max_entries=2, min_tokens=2)
    old, new = handle([1, 2]), handle([3, 4])
    registry.register(old)
    registry.register(new)
    assert registry.split([9, 1, 2, 9]) == [[9], old, [9]]  # ``old`` is in use
    registry.register(handle([5, 6]))
    assert registry.lookup(old.text) == old and registry.lookup(new.text) is None


def test_register_skips_short_texts_too(engine):
    handles = engine.precompute(["a", "start", PASSAGES[0]], register=False)
    engine.register(handles)
    assert len(engine.registry) == 1 and engine.registry.lookup(PASSAGES[0]) == handles[2]


def test_a_chunk_whose_last_token_merged_with_the_newlines_after_it_is_split_at_its_edge():
    """Byte-level BPE (Qwen) tokenizes a chunk's final "." and the "\\n\\n" after it as one token: the registry
    splits that token at the chunk's edge when the rest is whitespace, and only then."""
    from cacheblend_rag import ChunkHandle

    text = {1: "a", 2: "b", 3: ".", 4: ".\n\n", 5: "\n\n", 6: "...", 7: "q"}
    by_text = {v: k for k, v in text.items()}

    def boundary(merged, last):  # as PromptFormat.boundary does with a tokenizer
        whole, head = text[merged], text[last]
        rest = whole[len(head) :]
        ok = merged != last and whole.startswith(head) and rest and rest.isspace()
        return [by_text[rest]] if ok else None

    chunk = ChunkHandle("k", "ab.", (1, 2, 1, 2, 3), "fp")
    registry = ChunkRegistry(min_tokens=2)
    registry.register(chunk)
    assert registry.split([7, 1, 2, 1, 2, 4, 7], boundary) == [[7], chunk, [5, 7]]
    assert registry.split([7, 1, 2, 1, 2, 4, 7]) == [[7, 1, 2, 1, 2, 4, 7]]  # no boundary function: no match
    assert registry.split([7, 1, 2, 1, 2, 6, 7], boundary) == [[7, 1, 2, 1, 2, 6, 7]]  # "..." is text, not a match
    assert registry.split([1, 2, 1, 2, 3, 5], boundary) == [chunk, [5]]  # an exact match is unchanged


@pytest.mark.real_model
def test_qwen_prompt_with_a_chunk_before_a_blank_line_reuses_it():
    from cacheblend_rag.model.packaged import SPLIT_MODELS, ModelNotFoundError

    try:
        SPLIT_MODELS["qwen2.5-coder-0.5b"].part_paths()
    except ModelNotFoundError:
        pytest.skip("Qwen2.5-Coder-0.5B's wheels are not installed (make qwen)")
    engine = CacheBlendEngine.from_pretrained("qwen2.5-coder-0.5b", store=["memory://"])
    chunk = "The Greyhook Lighthouse stands on the point. It is 31 metres tall."
    (handle,) = engine.precompute([chunk])
    prompt = engine.format_chat([{"role": "user", "content": f"Context:\n\n{chunk}\n\nHow tall is the lighthouse?"}])
    assert not contains_run(handle.token_ids, engine.tokenize(prompt))  # "." and "\n\n" are one token here
    result = engine.generate(prompt=prompt, max_new_tokens=16)
    assert result.stats.cached_tokens == handle.n_tokens and "31" in result.text
