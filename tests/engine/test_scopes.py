"""Registry scopes: a scope's chunks are found only in its own prompts, and their stored KV is salted with the scope,
so one scope learns nothing about another's chunks (not from hits, from what is already stored, or from timing)."""

import pytest

from cacheblend_rag.engine.registry import ChunkRegistry
from cacheblend_rag.store import chain_key
from tests.conftest import PASSAGES, config

PROMPT = "Read:\n" + PASSAGES[0] + "\nQ: which river?"


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=4)


def test_the_default_scope_keeps_its_keys(engine):
    ids = engine.tokenize(PASSAGES[0])
    unsalted = chain_key(engine.fingerprint, chain_key(engine.fingerprint, None, engine.chunk_prefix_ids), ids)
    assert engine.handle(PASSAGES[0]).key == engine.handle(PASSAGES[0], scope=None).key == unsalted
    assert engine.handle(PASSAGES[0], scope="a").key not in (unsalted, engine.handle(PASSAGES[0], scope="b").key)


def test_a_scope_finds_only_its_own_chunks(engine):
    (mine,) = engine.precompute([PASSAGES[0]], scope="a")
    assert engine.generate(prompt=PROMPT, max_new_tokens=1, scope="a").stats.cached_tokens == mine.n_tokens
    for other in (None, "b"):
        assert engine.generate(prompt=PROMPT, max_new_tokens=1, scope=other).stats.cached_tokens == 0
        assert all(b.handle is None for b in engine.blocks(prompt=PROMPT, scope=other))
    # a handle of one scope is refused in another's request
    with pytest.raises(ValueError, match="registry scope"):
        engine.generate(["Q:\n", mine, "\nA?"], max_new_tokens=1, scope="b")
    with pytest.raises(ValueError, match="registry scope"):
        engine.register([mine], scope="b")
    assert engine.metrics()["registered_chunks"] == 1


def test_what_is_already_stored_is_per_scope(engine):
    def computed(scope):
        before = engine.metrics()["precomputed_chunks"]
        engine.precompute([PASSAGES[1]], scope=scope)
        return engine.metrics()["precomputed_chunks"] - before

    assert computed("a") == 1
    assert computed("b") == 1  # what "a" stored is not "b"'s: computed again, under another key
    assert computed(None) == 1
    assert computed("a") == computed("b") == computed(None) == 0


def test_prefix_cache_entries_are_salted(engine):
    def reused(scope):
        segments = ["System: be brief.\n", *engine.precompute(PASSAGES[:2], register=False, scope=scope), "\nQ?"]
        return engine.prepare(segments, config=config("prefix_cache"), scope=scope).stats.reused_tokens

    assert reused("a") == 0 and reused("a") > 0
    assert reused("b") == 0 and reused(None) == 0


def test_scope_registries_are_made_by_the_factory_and_bounded(make_engine):
    engine = make_engine("llama", seed=4, max_scopes=2)
    made = []

    def factory(scope):
        made.append(scope)
        return ChunkRegistry(**engine.registry_options())

    engine.registry_factory = factory
    engine.precompute([PASSAGES[0]], scope="a")
    assert engine.registry_for("a") is engine.registry_for("a")
    engine.blocks(prompt=PROMPT, scope="b")
    assert made == ["a", "b"]
    engine.blocks(prompt=PROMPT, scope="c")  # the least recently used scope, "a", is forgotten
    assert engine.registry_for("a").lookup(PASSAGES[0]) is None and made == ["a", "b", "c", "a"]
    assert engine.registry_for(None) is engine.registry and None not in made
    for bad in ("", 3, "x" * 300):
        with pytest.raises(ValueError, match="scope must be None"):
            engine.blocks(prompt=PROMPT, scope=bad)


def test_blocks_are_passed_back_checked(engine):
    (handle,) = engine.precompute([PASSAGES[0]], scope="a")
    blocks = engine.blocks(prompt=PROMPT, scope="a")
    direct = engine.generate(prompt=PROMPT, max_new_tokens=4, scope="a")
    passed = engine.generate(blocks=blocks, max_new_tokens=4, scope="a")
    assert passed.token_ids == direct.token_ids and passed.stats.cached_tokens == handle.n_tokens
    with pytest.raises(ValueError, match="registry scope"):
        engine.prepare(blocks=blocks, scope="b")
    with pytest.raises(ValueError, match=r"blocks=\.\.\. alone"):
        engine.prepare(blocks=blocks, prompt=PROMPT, scope="a")
    with pytest.raises(TypeError, match=r"engine\.blocks"):
        engine.prepare(blocks=[b.token_ids for b in blocks])
    moved = [*blocks]
    moved[1] = type(blocks[1])(blocks[1].token_ids, blocks[1].handle, start=blocks[1].start + 1)
    with pytest.raises(ValueError, match="not placed"):
        engine.prepare(blocks=moved, scope="a")
    forged = [type(b)(list(b.token_ids), b.handle, b.start, b.offset) for b in blocks]
    forged[-1].token_ids[0] = 10**9
    with pytest.raises(ValueError, match="vocabulary"):
        engine.prepare(blocks=forged, scope="a")
    chunk = next(i for i, b in enumerate(blocks) if b.handle is not None)
    wrong = [*blocks]
    wrong[chunk] = type(blocks[chunk])(blocks[chunk].token_ids[::-1], handle, blocks[chunk].start)
    with pytest.raises(ValueError, match="not its chunk's"):
        engine.prepare(blocks=wrong, scope="a")
