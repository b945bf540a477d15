"""Ingesting a large file: robust splitting, the KV it will write said up front, a cap; and `ingest` never
removes folders it did not make."""

from __future__ import annotations

import random
import re
import time

import pytest
from cacheblend_rag_app import KVBudgetError, RagIndex, read_documents
from cacheblend_rag_app.index import kv_bytes_per_token
from cacheblend_rag_app.sections import MAX_SECTION_CHARS, regex_sentences, sentences, split_nodes, split_sections
from typer.testing import CliRunner

from cacheblend_rag.cli import app

WORDS = re.findall(
    r"\w+",
    "the harbour town of port merrow lies on a tidal estuary where fishing boats moor beside "
    "the old stone quay and gulls cry over the market square at dawn",
)


def paragraph(rng: random.Random) -> str:
    sentences = (
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "."
        for _ in range(rng.randint(2, 7))
    )
    return " ".join(sentences)


def large_text(n_chars: int, seed: int = 0) -> str:
    """Paragraphs separated by single blank lines (one "paragraph" to LlamaIndex, which splits at three)."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        parts.append(paragraph(rng))
        size += len(parts[-1]) + 2
    return "\n\n".join(parts)


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=2, disk=True)


def test_split_sections_on_a_multi_mb_text():
    blank_lines = large_text(6_000_000)  # cut after blank lines
    one_line = " ".join(large_text(600_000, seed=1).split("\n\n"))  # no line break: cut after sentences
    no_space = "x" * 200_000  # no break at all: cut anyway
    text = blank_lines + "\n\n" + one_line + "\n" + no_space + "\n\nThe end."
    started = time.perf_counter()
    sections = split_sections(text)
    assert time.perf_counter() - started < 30  # linear: about a second on a busy 2-core machine
    assert "".join(sections) == text and all(0 < len(s) <= MAX_SECTION_CHARS for s in sections)
    assert len(sections) < 2.2 * len(text) / MAX_SECTION_CHARS  # every cut is in the second half of its window
    ends, offset = [], 0
    for section in sections:
        offset += len(section)
        ends.append((offset, section))
    assert all(s.endswith("\n\n") for end, s in ends if end < len(blank_lines))
    assert all(s.endswith(". ") for end, s in ends if len(blank_lines) + 2 < end < len(blank_lines) + len(one_line))
    assert sum(set(s) == {"x"} and len(s) == MAX_SECTION_CHARS for s in sections) == 3


def test_regex_sentences_are_lossless_and_linear():
    text = 'One. "Two!" Three?  (Four.) 3.14 is pi\nFive'
    assert regex_sentences(text) == ["One. ", '"Two!" ', "Three?  ", "(Four.) ", "3.14 is pi\nFive"]
    worst = "." * 1_000_000 + "'" * 1_000_000 + " x"
    started = time.perf_counter()
    assert "".join(regex_sentences(worst)) == worst
    assert time.perf_counter() - started < 10


def test_nltk_failing_on_a_section_falls_back_to_regex_sentences(engine, monkeypatch):
    import nltk.redos

    sentences("Warm up. The punkt data is loaded once.")
    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 1e-9)  # NLTK's regex time limit trips on anything now
    documents = [_document("big.txt", large_text(120_000))]
    from llama_index.core import Document

    docs = [Document(text=d.text, id_=d.doc_id, metadata={"file_name": d.name}) for d in documents]
    nodes = split_nodes(engine, docs, chunk_size=256, chunk_overlap=0)
    assert len(nodes) > 100 and all(len(engine.tokenize(n.get_content())) <= 256 for n in nodes)
    assert {n.ref_doc_id for n in nodes} == {documents[0].doc_id}  # sections keep their document as the source
    words = documents[0].text.split()
    assert " ".join(n.get_content() for n in nodes).split() == words  # nothing lost, nothing repeated


def _document(name: str, text: str):
    from cacheblend_rag_app import SourceDocument

    return SourceDocument(f"/docs/{name}", name, text)


def test_build_states_the_kv_it_will_write_and_refuses_over_the_cap(engine):
    documents = [_document("big.txt", large_text(60_000))]
    plans = []
    with pytest.raises(KVBudgetError, match=r"would write about .* of KV \(\d+ new chunks.*over the cap of 1.0 MB"):
        RagIndex.build(engine, documents, chunk_size=128, chunk_overlap=0, max_kv_bytes=1_000_000, on_plan=plans.append)
    [plan] = plans
    assert plan.chunks == plan.new_chunks > 50 and plan.kv_bytes == plan.new_tokens * kv_bytes_per_token(engine)
    assert engine.metrics()["precomputed_chunks"] == 0  # refused before computing anything
    # the estimate is the KV the store really writes
    (handle,) = engine.precompute(["A chunk of a few words, to measure the bytes of its stored KV."])
    assert engine.store.get(handle.key).nbytes == handle.n_tokens * kv_bytes_per_token(engine)


def test_ingest_says_what_it_will_write_and_honours_max_kv_bytes(tiny_dir, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(large_text(300_000))
    runner = CliRunner()
    options = ["--model", str(tiny_dir), "--dtype", "float32", "--cache-dir", str(tmp_path / "cache")]
    out = runner.invoke(app, ["ingest", str(big), *options, "--max-kv-bytes", "2MB"])
    text = " ".join(out.output.split())
    assert out.exit_code == 2, out.output
    assert "read 1 document (0.3 MB of text)" in text and "chunks (0 already stored): computing" in text
    assert re.search(
        r"would write about [\d.]+ MB of KV \(\d+ new chunks, [\d,]+ tokens\), over the cap of 2.0 MB; "
        r"nothing was computed\. Raise the cap \(cacheblend ingest --max-kv-bytes\)",
        text,
    )
    assert "Traceback" not in out.output and not list((tmp_path / "cache").rglob("*.safetensors"))
    bad = runner.invoke(app, ["ingest", str(big), *options, "--max-kv-bytes", "lots"])
    assert bad.exit_code == 2 and "--max-kv-bytes: cannot read a byte size from 'lots'" in bad.output


def test_ingest_of_a_small_folder_still_works(tiny_dir, docs_dir, tmp_path):
    options = ["--model", str(tiny_dir), "--dtype", "float32", "--cache-dir", str(tmp_path / "cache")]
    out = CliRunner().invoke(app, ["ingest", str(docs_dir), *options, "--max-kv-bytes", "none"])
    text = " ".join(out.output.split())
    assert out.exit_code == 0, out.output
    assert "3 chunks (0 already stored): computing 3 chunks" in text and "indexed 3 documents as 3 chunks" in text


# ---- persisting an index never removes folders it did not make -------------------------------------------------
def test_persist_never_removes_folders_it_did_not_make(engine, docs_dir, tmp_path):
    index = RagIndex.build(engine, read_documents(docs_dir), chunk_size=128, chunk_overlap=0)
    for name in ("index.old", "index.new"):  # a user's own folders, named like the old temporary ones
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    folder = index.persist(tmp_path / "index")
    index.persist(folder)  # replacing an index too
    assert (tmp_path / "index.old" / "keep.txt").read_text() == "index.old"
    assert (tmp_path / "index.new" / "keep.txt").read_text() == "index.new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".index", "index"))) == [
        "index",
        "index.new",
        "index.old",
    ]
    assert RagIndex.load(engine, folder).n_nodes == 3


def test_persist_that_fails_keeps_the_previous_index(engine, docs_dir, tmp_path, monkeypatch):
    index = RagIndex.build(engine, read_documents(docs_dir), chunk_size=128, chunk_overlap=0)
    folder = index.persist(tmp_path / "index")
    before = sorted(p.name for p in folder.iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index.index.storage_context, "persist", full_disk)
    with pytest.raises(OSError, match="No space left"):
        index.persist(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index")] == []
