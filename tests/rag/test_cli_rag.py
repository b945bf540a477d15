"""`cacheblend ingest` and `cacheblend ask` on a small folder with the real SmolLM2-135M and MiniLM."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cacheblend_rag.cli import app

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
runner = CliRunner()
QUESTION = "How tall is the Brannock Light?"  # 44 metres


def run(*args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, smollm2_dir):
    """The documents of conftest.DOCUMENTS ingested once: (options for ask, ingest output, folders)."""
    from .conftest import DOCUMENTS

    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    for name, text in DOCUMENTS.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    options = ["--model", smollm2_dir, "--dtype", "float32", "--cache-dir", root / "cache"]
    out = run("ingest", docs, *options)
    return options, out, root


def test_ingest_indexes_and_precomputes(ingested):
    _, out, root = ingested
    assert "read 3 documents" in out and "indexed 3 documents as 3 chunks" in out
    assert "3 chunks computed, 0 already stored" in out
    manifest = json.loads((root / "cache" / "index" / "cacheblend_index.json").read_text())
    assert manifest["documents"] == ["bakery.md", "lighthouse.md", "notes/ferry.txt"] and manifest["nodes"] == 3
    assert manifest["context"] == 2 and manifest["neighbours"] == "lexical"
    assert len(list((root / "cache" / "kv").rglob("*.safetensors"))) >= 3


def test_ask_answers_from_the_index_and_reuses_kv(ingested, tmp_path):
    options, _, _ = ingested
    answers = []
    for i in range(2):
        out = run("ask", QUESTION, *options, "--top-k", 2, "--max-new-tokens", 16, "--json", tmp_path / f"{i}.json")
        assert "TTFT" in out and "sources: lighthouse.md" in out
        answers.append(json.loads((tmp_path / f"{i}.json").read_text()))
    first, second = answers
    assert set(first) >= {
        "question",
        "text",
        "strategy",
        "recompute_ratio",
        "ttft_s",
        "prompt_tokens",
        "reused_tokens",
        "recomputed_tokens",
        "cache_hits",
        "cache_misses",
        "sources",
        "index_dir",
    }
    assert "44" in first["text"] and first["text"] in " ".join(
        run("ask", QUESTION, *options, "--top-k", 2, "--max-new-tokens", 16).split()
    )
    for answer in answers:  # every chunk's KV came from the store written at ingestion: none computed now
        assert answer["reused_tokens"] > 0 and answer["cache_hits"] == 2 and answer["cache_misses"] == 0
        assert answer["reused_tokens"] + answer["recomputed_tokens"] == answer["prompt_tokens"]
    assert second["text"] == first["text"] and second["prompt_tokens"] == first["prompt_tokens"]

    run(
        "ask",
        QUESTION,
        *options,
        "--top-k",
        2,
        "--max-new-tokens",
        4,
        "--strategy",
        "full_recompute",
        "--json",
        tmp_path / "full.json",
    )
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["reused_tokens"] == 0 and full["recomputed_tokens"] == full["prompt_tokens"] == first["prompt_tokens"]


def test_ingest_again_finds_the_stored_kv(ingested):
    options, _, root = ingested
    out = run("ingest", root / "docs", *options, "--index-dir", root / "again")
    assert "indexed 3 documents as 3 chunks" in out and "0 chunks computed, 3 already stored" in out
    assert "--index-dir" in out
    # one document alone: its chunk has no other chunk to be computed after, so its KV is another (computed now)
    out = run("ingest", root / "docs" / "lighthouse.md", *options, "--index-dir", root / "one")
    assert "indexed 1 documents as 1 chunks" in out and "1 chunks computed, 0 already stored" in out
    out = run("ingest", root / "docs", *options, "--context", "0", "--index-dir", root / "alone")
    assert "2 chunks computed, 1 already stored" in out  # computed alone: lighthouse.md's, stored just above
    out = run("ingest", root / "docs", *options, "--neighbours", "bm25", "--index-dir", root / "bad", code=2)
    assert "--neighbours must be 'lexical' or 'embedding'" in out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "it is empty"),
        (lambda p: (p.mkdir(), (p / "scan.pdf").write_bytes(b"%PDF")), "holds no .txt or .md file"),
        (lambda p: (p.mkdir(), (p / "a.txt").write_text("")), "no readable .txt/.md file"),
    ],
    ids=["missing", "empty", "no-text-files", "only-empty-files"],
)
def test_ingest_errors_name_the_path(tmp_path, setup, message):
    path = tmp_path / "in"
    setup(path)
    out = run("ingest", path, "--cache-dir", tmp_path, code=2)
    assert "error:" in out and message in out and str(path) in out


def test_ingest_never_overwrites_a_folder_that_is_not_an_index(ingested, tmp_path):
    _, _, root = ingested
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    out = run("ingest", root / "docs", "--index-dir", tmp_path / "mine", code=2)
    assert "is not a cacheblend index" in out and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ask_before_ingest_names_the_ingest_command(tmp_path):
    out = run("ask", QUESTION, "--cache-dir", tmp_path, code=2)
    assert "no index in" in out and "cacheblend ingest PATH" in out


def test_ask_rejects_a_bad_strategy_and_an_empty_question(ingested):
    options, _, _ = ingested
    assert "--strategy must be one of" in run("ask", QUESTION, *options, "--strategy", "magic", code=2)
    assert "the question is empty" in run("ask", " ", *options, code=2)
