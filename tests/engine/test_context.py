"""Chunks precomputed after a context (``precompute(context=...)``): their KV is the chunk's rows of a prefill of
chunk prefix + context + chunk, their key names the context, a store miss recomputes them with it, and prompts reuse
them."""

import pytest
import torch

from cacheblend_rag.store import chain_key
from tests.conftest import PASSAGES, config


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=7)


def chunk_rows(engine, context_ids, token_ids):
    """The chunk's rows of one prefill of chunk prefix + context + chunk: [L, Hkv, T, D] each."""
    kv = engine.compute_chunk(list(context_ids) + list(token_ids))  # [L, Hkv, C + T, D]
    n = len(token_ids)
    return kv.k[:, :, -n:], kv.v[:, :, -n:]


def test_a_context_chunk_is_its_rows_of_a_full_prefill(engine):
    (handle,) = engine.precompute([PASSAGES[0]], context=[[PASSAGES[1], PASSAGES[2]]])
    want = engine.tokenize(PASSAGES[1]) + engine.tokenize(PASSAGES[2])
    assert list(handle.context_ids) == want
    kv, hit = engine.chunk_kv(handle)
    assert hit
    k, v = chunk_rows(engine, handle.context_ids, handle.token_ids)
    torch.testing.assert_close(kv.k, k)
    torch.testing.assert_close(kv.v, v)
    alone, _ = engine.chunk_kv(engine.handle(PASSAGES[0]))  # computed on this miss
    assert not torch.allclose(alone.v, kv.v)  # the context changed the KV


def test_the_key_names_the_context(engine):
    alone = engine.handle(PASSAGES[0])
    a = engine.handle(PASSAGES[0], context_ids=engine.tokenize(PASSAGES[1]))
    b = engine.handle(PASSAGES[0], context_ids=engine.tokenize(PASSAGES[2]))
    assert len({alone.key, a.key, b.key}) == 3
    fp = engine.fingerprint
    prefix = chain_key(fp, None, engine.chunk_prefix_ids)
    assert a.key == chain_key(fp, chain_key(fp, prefix, a.context_ids), a.token_ids)
    assert alone.key == chain_key(fp, prefix, alone.token_ids) and alone.context_ids == ()
    assert a.to_dict()["context_ids"] == list(a.context_ids) and "context_ids" not in alone.to_dict()


def test_check_accepts_a_context_handle_in_its_scope_only(engine):
    from dataclasses import replace

    keys = engine.chunk_source.keys
    (handle,) = engine.precompute([PASSAGES[0]], context=[[PASSAGES[1]]], scope="s")
    assert keys.check(handle, "s") is handle
    with pytest.raises(ValueError, match="registry scope"):
        keys.check(handle, None)
    tampered = replace(handle, context_ids=tuple(engine.tokenize(PASSAGES[2])))
    with pytest.raises(ValueError, match="does not match its tokens and context"):
        keys.check(tampered, "s")
    with pytest.raises(ValueError, match="does not match"):
        keys.check(replace(handle, context_ids=()), "s")


def test_a_store_miss_recomputes_with_the_context(engine):
    (handle,) = engine.precompute([PASSAGES[0]], context=[[PASSAGES[1]]])
    stored, _ = engine.chunk_kv(handle)
    stored = (stored.k.clone(), stored.v.clone())
    engine.store.delete(handle.key)
    assert not engine.store.contains(handle.key)
    kv, hit = engine.chunk_kv(handle)
    assert not hit and engine.metrics()["computed_on_miss"] == 1
    torch.testing.assert_close(kv.k, stored[0])
    torch.testing.assert_close(kv.v, stored[1])


@pytest.mark.parametrize("strategy", ["full_reuse", "cacheblend"])
def test_generate_reuses_a_context_handle(engine, strategy):
    handles = engine.precompute(PASSAGES[:3], context=2)
    result = engine.generate(["Q:\n", *handles, "\nA?"], config=config(strategy), max_new_tokens=3)
    assert result.stats.cached_tokens == sum(h.n_tokens for h in handles)
    assert engine.metrics()["computed_on_miss"] == 0
    # a prompt string holding a chunk text finds its registered context handle
    prompt = "Read:\n" + PASSAGES[1] + "\nQ: which river?"
    result = engine.generate(prompt=prompt, config=config(strategy), max_new_tokens=1)
    assert result.stats.cached_tokens == handles[1].n_tokens and engine.metrics()["computed_on_miss"] == 0
    assert engine.registry.lookup(PASSAGES[1]) == handles[1]


RIVER = [
    "The Tarrow river floods the Wexland lowlands each spring; the Tarrow ferry stops running in flood.",
    "A bridge over the Tarrow river replaced the Tarrow ferry in 1893, after the worst flood on record.",
    "The Calder mill grinds barley from the hill farms; the Calder millers bake bread on Sundays.",
    "Bread from the Calder mill is sold at the market, where the millers also sell barley flour.",
]


def test_precompute_context_k_picks_the_k_lexically_nearest_texts(engine):
    from cacheblend_rag.engine.chunk_source import nearest_contexts

    handles = engine.precompute(RIVER, context=1, register=False)
    partner = [1, 0, 3, 2]  # the text sharing its rare words
    for i, handle in enumerate(handles):
        assert list(handle.context_ids) == engine.tokenize(RIVER[partner[i]])
    two = nearest_contexts(RIVER, 2, engine.tokenize)
    assert [c[-1] for c in two] == [RIVER[j] for j in partner]  # the nearest stands right before the chunk
    handles = engine.precompute(RIVER, register=False)  # the default: the 2 nearest
    assert [list(h.context_ids) for h in handles] == [[t for c in ctx for t in engine.tokenize(c)] for ctx in two]
    copy, _, again = engine.precompute([RIVER[0], RIVER[2], RIVER[0]], context=1, register=False)
    assert copy == again and list(copy.context_ids) == engine.tokenize(RIVER[2])  # a copy is not a neighbour
    assert engine.precompute(RIVER[::-1], register=False) == handles[::-1]  # the order of the call does not matter
    assert engine.nearest_contexts(RIVER, 2) == two
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        engine.nearest_contexts(RIVER, [[RIVER[1]]] * 4)
    with pytest.raises(TypeError, match="wrap a single text"):
        engine.nearest_contexts(RIVER[0], 1)
    with pytest.raises(ValueError, match="neighbours k >= 0"):
        engine.precompute(RIVER, context=True)
    alone = engine.precompute(RIVER, context=0, register=False)
    assert alone == engine.precompute(RIVER, context=None, register=False)
    assert [h.key for h in alone] == [engine.handle(t).key for t in RIVER]
    (only,) = engine.precompute(RIVER[:1], context=3, register=False)  # no other text: alone
    assert only.context_ids == ()
    # attach reads a retrieved list in order: each new text after the k before it (cyclic)
    attached = engine.attach(RIVER[:3], context=2)
    for i, handle in enumerate(attached):
        want = engine.tokenize(RIVER[(i - 2) % 3]) + engine.tokenize(RIVER[(i - 1) % 3])
        assert list(handle.context_ids) == want


@pytest.mark.parametrize(
    "context, match",
    [
        ([[PASSAGES[1]]], "context has 1 lists for 2 texts"),
        ([[PASSAGES[1]], [3]], r"context\[1\]\[0\] is a int"),
        ([[PASSAGES[1]], PASSAGES[2]], r"context\[1\] is a str"),
        (-1, "k >= 0"),
        ("abc", "context must be None, an int k or one list"),
    ],
)
def test_bad_context_is_a_clear_error(engine, context, match):
    with pytest.raises(ValueError, match=match):
        engine.precompute(PASSAGES[:2], context=context)


def test_batched_precompute_with_a_context_matches_one_by_one(make_engine):
    batched = make_engine("llama", seed=7)
    batched.chunk_source.batch_tokens = 4096
    one = make_engine("llama", seed=7)
    hb = batched.precompute(PASSAGES[:3], context=1)
    ho = one.precompute(PASSAGES[:3], context=1)
    assert hb == ho
    for a, b in zip(hb, ho):
        torch.testing.assert_close(batched.chunk_kv(a)[0].v, one.chunk_kv(b)[0].v)


MORE = [
    "The Nile delta holds farms on both banks, watered by canals that carry the river's flood to the fields.",
    "Lake Baikal in Siberia is the deepest lake in the world, more than 1,600 metres at its deepest point.",
    "The Atacama desert in Chile is one of the driest places on Earth, with some stations never recording rain.",
]


def context_of(engine, texts):
    return [t for text in texts for t in engine.tokenize(text)]


def test_attach_computes_new_texts_among_the_others_and_keeps_known_ones(engine):
    texts = PASSAGES[:3]
    handles = engine.attach(texts)  # nothing known yet: each after the 2 texts before it, cyclic
    for i, handle in enumerate(handles):
        assert list(handle.context_ids) == context_of(engine, [texts[(i - 2) % 3], texts[(i - 1) % 3]])
        assert engine.store.contains(handle.key) and engine.registry.lookup(texts[i]) == handle
    computed = engine.metrics()["precomputed_chunks"]
    assert computed == 3
    # retrieved again with another text: the registered ones keep their KV, the new one is computed after them
    again = engine.attach([texts[2], MORE[0], texts[0]])
    assert again[0] == handles[2] and again[2] == handles[0]
    assert list(again[1].context_ids) == context_of(engine, [texts[0], texts[2]])
    assert engine.metrics()["precomputed_chunks"] == computed + 1
    # a handle given (e.g. recorded at ingestion) wins over the registry, and is registered
    given = engine.handle(MORE[1], context_ids=engine.tokenize(PASSAGES[0]))
    (out,) = engine.attach([MORE[1]], handles=[given])
    assert out == given and engine.registry.lookup(MORE[1]) == given and engine.store.contains(given.key)
    # context=0: alone; a store miss on a known handle is computed again with its context
    assert engine.attach([MORE[2], PASSAGES[0]], context=0)[0] == engine.handle(MORE[2])
    engine.store.delete(handles[1].key)
    assert engine.attach([texts[1]]) == [handles[1]] and engine.store.contains(handles[1].key)
    kv, _ = engine.chunk_kv(handles[1])
    k, v = chunk_rows(engine, handles[1].context_ids, handles[1].token_ids)
    torch.testing.assert_close((kv.k, kv.v), (k, v))


@pytest.mark.parametrize("call", ["attach", "precompute"])
def test_context_k_drops_texts_that_would_not_fit_the_window(make_engine, call):
    """attach and precompute's default context=2 trim a chunk's context to the window; a context list given
    explicitly is computed as given or refused."""
    from cacheblend_rag.engine.chunk_source import nearest_contexts

    engine = make_engine("llama", seed=7)
    texts = PASSAGES[:3]
    window = engine.context_window - len(engine.chunk_prefix_ids)
    sizes = [len(engine.tokenize(p)) for p in texts]
    assert window > sum(sizes)
    # the nearest text before texts[2]: the one before it in the list (attach), its lexically nearest (precompute)
    nearest = texts[1] if call == "attach" else nearest_contexts(texts, 2, engine.tokenize)[2][-1]
    room = sizes[2] + len(engine.tokenize(nearest)) + 1  # room for one context text
    engine.chunk_source.context_window = len(engine.chunk_prefix_ids) + room
    handles = getattr(engine, call)(texts)
    assert list(handles[2].context_ids) == engine.tokenize(nearest)  # its farther context text dropped
    if call == "attach":
        assert engine.chunk_contexts(texts, 2)[2] == [texts[1]]
    else:
        with pytest.raises(ValueError, match=r"after \d+ of context"):
            engine.precompute([texts[2]], context=[[texts[0], texts[1]]])


def test_a_long_neighbour_is_cut_to_its_end_before_a_short_chunk(engine):
    """A context=k (attach, precompute) or a neighbour list (chunk_contexts) holds at most k * max(chunk tokens,
    CONTEXT_TOKENS) tokens: the texts nearest the chunk whole, the first that would overflow cut to its end (from a
    word on), those before it dropped; the chunk's KV is its rows of a prefill after exactly that."""
    from cacheblend_rag.engine.chunk_source import CONTEXT_TOKENS

    long = " ".join(f"Item {i} of the long ledger is entry number {i * 7}." for i in range(90))
    short, mid = PASSAGES[0], PASSAGES[1]
    assert len(engine.tokenize(long)) > 2 * CONTEXT_TOKENS
    budget = 2 * max(len(engine.tokenize(short)), CONTEXT_TOKENS)
    (ctx,) = engine.chunk_contexts([short], [[long, mid]])
    assert ctx[1] == mid and long.endswith(ctx[0]) and long[-len(ctx[0]) - 1] == " "  # cut at a word
    used = sum(len(engine.tokenize(c)) for c in ctx)
    assert budget - 16 <= used <= budget  # filled up to the budget, never past it
    (nearest_long,) = engine.chunk_contexts([short], [[mid, long]])  # the long text nearest: mid dropped
    assert len(nearest_long) == 1 and long.endswith(nearest_long[0])
    assert budget - 16 <= len(engine.tokenize(nearest_long[0])) <= budget
    # attach computes a new text after the same trimmed context (the previous texts, cyclic)
    handles = engine.attach([long, mid, short])
    assert list(handles[2].context_ids) == [t for c in ctx for t in engine.tokenize(c)]
    kv, _ = engine.chunk_kv(handles[2])
    k, v = chunk_rows(engine, handles[2].context_ids, handles[2].token_ids)
    torch.testing.assert_close((kv.k, kv.v), (k, v))
    # a long chunk keeps its neighbours whole: the budget grows with the chunk
    assert engine.chunk_contexts([long], [[short, mid]]) == [[short, mid]]


def test_attach_rejects_bad_input_clearly(engine):
    with pytest.raises(TypeError, match="wrap a single text"):
        engine.attach(PASSAGES[0])
    with pytest.raises(ValueError, match="handles has 1 entries for 2 texts"):
        engine.attach(PASSAGES[:2], handles=[None])
    with pytest.raises(ValueError, match="handle of another text"):
        engine.attach(PASSAGES[:1], handles=[engine.handle(PASSAGES[1])])
    with pytest.raises(ValueError, match="k >= 0"):
        engine.attach(PASSAGES[:2], context=-1)
    with pytest.raises(ValueError, match="no tokens"):
        engine.attach(["", PASSAGES[0]])
