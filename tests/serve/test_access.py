"""Who may call, register and see reuse, over real HTTP: API keys (401 in OpenAI's shape, /health open, the stock
``openai`` client), the admin key and the registry scope (403 for others' registrations, every caller's prompts
matched against the admin's chunks), reuse figures hidden from callers who may not register, /metrics for the
operator, per-request limits and per-key quotas on chunk registration."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import httpx
import pytest

from cacheblend_rag.config import BlendConfig
from cacheblend_rag.serve.access import Access, Caller, Unauthorized
from cacheblend_rag.serve.quota import ChunkQuota
from tests.conftest import PASSAGES

from .conftest import MODEL, chat, serving, tiny_engine

QUESTION = "Read the passages.\n" + "\n\n".join(PASSAGES) + "\nQuestion: which river flows through Brazil?"
ADMIN, ALICE, BOB = "admin-secret", "alice-key", "bob-key"


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


def post(live, path: str, body: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body, headers=auth(key), timeout=120)


@pytest.fixture(scope="module")
def keyed(tokenizer, tmp_path_factory):
    """A server with two client keys and an admin key (default scope: admin), the passages registered by the admin."""
    engine = tiny_engine(tokenizer, tmp_path_factory.mktemp("keyed"))
    with serving(engine, api_keys=[ALICE, BOB], admin_key=ADMIN) as live:
        registered = post(live, "/v1/chunks", {"texts": PASSAGES}, ADMIN)
        assert registered.status_code == 200, registered.text
        yield live


@pytest.mark.parametrize("headers", [{}, auth("wrong-key"), {"Authorization": f"Basic {ALICE}"}])
def test_every_endpoint_but_health_needs_a_key(keyed, headers):
    calls = [
        httpx.post(f"{keyed.url}/v1/chat/completions", json=chat("hi", max_tokens=2), headers=headers),
        httpx.post(f"{keyed.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers),
        httpx.post(f"{keyed.url}/v1/chunks", json={"texts": ["some text to register here"]}, headers=headers),
        httpx.get(f"{keyed.url}/v1/models", headers=headers),
        httpx.get(f"{keyed.url}/metrics", headers=headers),
        httpx.get(f"{keyed.url}/v1/no-such-endpoint", headers=headers),
    ]
    for response in calls:
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_each_key_works_and_the_stock_openai_client_sends_it(keyed):
    openai = pytest.importorskip("openai")
    for key in (ALICE, BOB, ADMIN):
        assert httpx.get(f"{keyed.url}/v1/models", headers=auth(key)).status_code == 200
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=BOB, max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()


def test_in_the_admin_scope_only_the_admin_registers_and_sees_reuse(keyed):
    refused = post(keyed, "/v1/chunks", {"texts": ["A text a client would like every prompt to reuse."]}, ALICE)
    assert refused.status_code == 403
    assert (
        refused.json()["error"]["code"] == "permission_denied" and "--admin-key" in refused.json()["error"]["message"]
    )
    # every caller's prompt is matched against what the admin registered; only the admin is told
    as_admin = post(keyed, "/v1/chat/completions", chat(QUESTION, max_tokens=4), ADMIN).json()
    as_alice = post(keyed, "/v1/chat/completions", chat(QUESTION, max_tokens=4), ALICE).json()
    assert as_admin["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 and as_admin["cacheblend"]["cache_hits"] == 3
    assert "prompt_tokens_details" not in as_alice["usage"]
    assert as_alice["cacheblend"] == {"strategy": "cacheblend", "reuse": "hidden"}
    assert as_alice["choices"] == as_admin["choices"] and as_alice["usage"]["prompt_tokens"] > 0
    stream = httpx.post(
        f"{keyed.url}/v1/chat/completions",
        json=chat(QUESTION, max_tokens=4, stream=True, stream_options={"include_usage": True}),
        headers=auth(ALICE),
        timeout=120,
    )
    assert '"cached_tokens"' not in stream.text and '"reuse": "hidden"' in stream.text
    # /metrics counts every caller's hits: the operator's
    assert httpx.get(f"{keyed.url}/metrics", headers=auth(ALICE)).status_code == 403
    assert httpx.get(f"{keyed.url}/metrics", headers=auth(ADMIN)).status_code == 200


def test_public_reuse_stats_and_the_open_scope(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer, tmp_path)
    with serving(engine, api_keys=[ALICE], admin_key=ADMIN, reuse_stats="public") as live:
        post(live, "/v1/chunks", {"texts": PASSAGES}, ADMIN)
        seen = post(live, "/v1/chat/completions", chat(QUESTION, max_tokens=2), ALICE).json()
        assert seen["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    with serving(engine, api_keys=[ALICE, BOB], registry_scope="open") as live:
        mine = post(live, "/v1/chunks", {"texts": ["Alice's own passage, registered through her key."]}, ALICE)
        assert mine.status_code == 200 and mine.json()["computed"] == 1
        assert post(live, "/v1/chunks", {"texts": PASSAGES}, BOB).json()["already_stored"] == 3


def test_in_the_key_scope_each_key_reuses_only_its_own_chunks_and_learns_nothing_of_others(tokenizer, tmp_path):
    """Alice's chunks are reused in Alice's prompts only; Bob registering the same texts computes them again (their
    KV is salted per key), so nothing Bob sees (cached tokens, hits, already_stored) depends on what Alice did."""
    engine = tiny_engine(tokenizer, tmp_path)
    with serving(engine, api_keys=[ALICE, BOB], registry_scope="key") as live:
        mine = post(live, "/v1/chunks", {"texts": PASSAGES}, ALICE).json()
        assert mine["computed"] == 3 and mine["already_stored"] == 0
        as_alice = post(live, "/v1/chat/completions", chat(QUESTION, max_tokens=4), ALICE).json()
        as_bob = post(live, "/v1/chat/completions", chat(QUESTION, max_tokens=4), BOB).json()
        assert as_alice["cacheblend"]["cache_hits"] == 3 and as_alice["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert (
            as_bob["cacheblend"]["cache_hits"] == 0 and as_bob["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        )
        text = post(live, "/v1/completions", {"model": MODEL, "prompt": QUESTION, "max_tokens": 2}, BOB).json()
        assert text["cacheblend"]["cache_hits"] == 0
        theirs = post(live, "/v1/chunks", {"texts": PASSAGES}, BOB).json()
        assert theirs["computed"] == 3 and theirs["already_stored"] == 0  # not Alice's stored KV
        assert (
            post(live, "/v1/chat/completions", chat(QUESTION, max_tokens=4), BOB).json()["cacheblend"]["cache_hits"]
            == 3
        )


def test_no_keys_means_the_open_scope_and_anonymous_callers(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer, tmp_path)
    with serving(engine) as live:  # stock clients send a placeholder key: it is not checked
        assert post(live, "/v1/chunks", {"texts": PASSAGES}, "unused").status_code == 200
        answer = post(live, "/v1/chat/completions", chat(QUESTION, max_tokens=2), "unused").json()
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_keys_resolve_in_constant_time_to_stable_callers():
    access = Access(["k1", "k2"], "adm")
    assert access.caller("Bearer k1") == access.caller("bearer  k1 ") != access.caller("Bearer k2")
    assert access.caller("Bearer adm") == Caller("admin", admin=True)
    assert "k1" not in access.caller("Bearer k1").id
    for header in (None, "", "Bearer", "Basic k1", "Bearer k3", "k1"):
        with pytest.raises(Unauthorized):
            access.caller(header)
    assert Access(admin_key="adm").caller("Bearer whatever").id == "anonymous"
    assert Access().scope.value == "open" and Access(["k"]).scope.value == "admin" and Access(admin_key="a").keyed
    with pytest.raises(ValueError, match="registry scope 'everyone': use open, admin or key"):
        Access(registry_scope="everyone")
    with pytest.raises(ValueError, match="use private or public"):
        Access(reuse_stats="all")
    with pytest.raises(ValueError, match="non-empty"):
        Access([" padded "])
    warnings = " ".join(Access(registry_scope="admin").warnings("0.0.0.0"))
    assert "--api-key" in warnings and "no client can register chunks" in warnings
    assert Access(["k"], "a").warnings("0.0.0.0") == [] and Access().warnings("::1") == []


def test_two_keys_whose_digests_share_a_prefix_have_a_scope_and_a_quota_each():
    """A key's caller was named by 12 hex digits of its sha256, and that name was its registry scope and quota: two
    keys sharing those 48 bits (anyone who may choose a key finds one with 2^24 hashes; these two share them) shared
    both, so one read the other's chunks. The whole digest names them now; logs show the short form."""
    one, two = "probe-key-19291407", "probe-key-25111546"
    assert hashlib.sha256(one.encode()).hexdigest()[:12] == hashlib.sha256(two.encode()).hexdigest()[:12]
    access = Access([one, two], registry_scope="key")
    first, second = access.caller(f"Bearer {one}"), access.caller(f"Bearer {two}")
    assert first != second and access.scope_of(first) != access.scope_of(second)
    assert first.name == second.name == "key-" + hashlib.sha256(one.encode()).hexdigest()[:12]
    quota = ChunkQuota(max_texts=1, max_tokens=0)
    quota.charge(first, [SimpleNamespace(key="a chunk", n_tokens=10)])
    quota.charge(second, [SimpleNamespace(key="another chunk", n_tokens=10)])  # its own quota: no QuotaExceeded


def test_prefix_cache_stores_the_prompt_so_it_takes_the_right_to_register_and_counts_in_the_quota(
    keyed, tokenizer, tmp_path
):
    """strategy prefix_cache stores the prompt's blocks for every later request of the scope. Under the admin scope
    a client's prompt made another client's identical prompt 20x faster (telling it the prompt was sent), and in
    every scope it stored KV past the key's quota (a 4 KB prompt stored 48 MB in Redis)."""
    body = chat(QUESTION, max_tokens=2, cacheblend={"strategy": "prefix_cache"})
    refused = post(keyed, "/v1/chat/completions", body, ALICE)
    assert refused.status_code == 403 and "--registry-scope key" in refused.json()["error"]["message"]
    assert post(keyed, "/v1/chat/completions", body, ADMIN).status_code == 200
    engine = tiny_engine(tokenizer, tmp_path)
    with serving(engine, api_keys=[ALICE], config=BlendConfig(strategy="prefix_cache"), chunk_quota_tokens=1) as live:
        plain = chat(QUESTION, max_tokens=2)  # the operator's default for every request: neither refused nor counted
        assert [post(live, "/v1/chat/completions", plain, ALICE).status_code for _ in range(2)] == [200, 200]
    with serving(engine, api_keys=[ALICE, BOB], registry_scope="key", chunk_quota_tokens=300) as live:
        short = chat("Hello there, how are you?", max_tokens=2, cacheblend={"strategy": "prefix_cache"})
        for _ in range(2):  # the same blocks are counted once
            assert post(live, "/v1/chat/completions", short, ALICE).status_code == 200
        long = chat("word " * 400, max_tokens=2, cacheblend={"strategy": "prefix_cache"})
        requests = engine.metrics()["requests"]
        over = post(live, "/v1/chat/completions", long, ALICE)
        assert over.status_code == 429 and "--chunk-quota-tokens" in over.json()["error"]["message"]
        assert engine.metrics()["requests"] == requests  # refused before it ran: nothing stored
        registered = post(live, "/v1/chunks", {"texts": ["word " * 290]}, ALICE)
        assert registered.status_code == 429  # the prompt blocks count with the chunks
        assert post(live, "/v1/chunks", {"texts": ["word " * 290]}, BOB).status_code == 200  # another key's quota


def test_chunk_limits_per_request_and_quotas_per_key(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer, tmp_path)
    options = dict(max_chunk_texts=3, max_chunk_tokens=200, chunk_quota_texts=4, chunk_quota_tokens=10_000)
    texts = [f"Passage number {i} about rivers, mountains and the lakes between them." for i in range(6)]
    with serving(engine, api_keys=[ALICE, BOB], admin_key=ADMIN, registry_scope="open", **options) as live:
        many = post(live, "/v1/chunks", {"texts": texts[:4]}, ALICE)
        assert many.status_code == 413 and "--max-chunk-texts" in many.json()["error"]["message"]
        long = post(live, "/v1/chunks", {"texts": ["word " * 150, "word " * 150]}, ALICE)
        assert long.status_code == 413 and "--max-chunk-tokens" in long.json()["error"]["message"]
        huge = post(live, "/v1/chunks", {"texts": ["x" * 200 * 33]}, ALICE)  # refused by its bytes
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_many_tokens"
        assert post(live, "/v1/chunks", {"texts": texts[:3]}, ALICE).status_code == 200
        assert post(live, "/v1/chunks", {"texts": texts[:3]}, ALICE).status_code == 200  # counted once
        over = post(live, "/v1/chunks", {"texts": texts[3:5]}, ALICE)
        assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"
        assert "--chunk-quota-texts" in over.json()["error"]["message"] and "Retry-After" not in over.headers
        assert engine.registry.lookup(texts[3]) is None  # nothing of the refused request was computed
        assert post(live, "/v1/chunks", {"texts": texts[3:5]}, BOB).status_code == 200  # another key's quota
        assert post(live, "/v1/chunks", {"texts": texts[5:]}, ADMIN).status_code == 200  # the admin is exempt
        assert post(live, "/v1/chunks", {"texts": texts[3:4]}, ALICE).status_code == 200  # 4th distinct: fits
