"""Reading documents to ingest, the bundled corpus and the demo's questions (no model needed)."""

from __future__ import annotations

import re

import pytest
from cacheblend_rag_app import DocumentError, read_documents, sample_corpus
from cacheblend_rag_app.sample_questions import QUESTIONS, CorpusQuestion

from .conftest import DOCUMENTS


def test_reads_text_and_markdown_recursively(docs_dir):
    docs = read_documents(docs_dir)
    assert [d.name for d in docs] == ["bakery.md", "lighthouse.md", "notes/ferry.txt"]
    assert {d.name: d.text for d in docs} == {name: text.strip() for name, text in DOCUMENTS.items()}
    assert len({d.doc_id for d in docs}) == 3 and all(d.doc_id.startswith("/") for d in docs)


def test_reads_one_file(docs_dir):
    [doc] = read_documents(docs_dir / "notes" / "ferry.txt")
    assert doc.name == "ferry.txt" and "Little Heron" in doc.text


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "it is empty"),
        (lambda root: (root.mkdir(), (root / "a.pdf").write_bytes(b"%PDF")), "holds no .txt or .md file"),
        (lambda root: (root.mkdir(), (root / "a.md").write_text("  \n")), "a.md (empty)"),
        (lambda root: (root.mkdir(), (root / "b.txt").write_bytes(b"\xff\xfe\xfa")), "b.txt (unreadable"),
    ],
    ids=["missing", "empty-folder", "no-text-files", "empty-file", "not-utf8"],
)
def test_nothing_to_read_is_a_clear_error(tmp_path, setup, message):
    root = tmp_path / "in"
    setup(root)
    with pytest.raises(DocumentError, match=re.escape(message)) as info:
        read_documents(root)
    assert str(root) in str(info.value)


def test_other_suffix_is_rejected(tmp_path):
    path = tmp_path / "notes.pdf"
    path.write_bytes(b"%PDF")
    with pytest.raises(DocumentError, match=re.escape("is not a .txt or .md file")):
        read_documents(path)


def test_sample_corpus_is_a_few_dozen_short_documents():
    docs = read_documents(sample_corpus())
    assert 25 <= len(docs) <= 40
    words = [len(d.text.split()) for d in docs]
    assert min(words) >= 80 and max(words) <= 200, words


def test_demo_questions_are_answerable_from_their_documents():
    from cacheblend_rag.cli.demo import RAG_QUESTIONS

    assert len(QUESTIONS) == RAG_QUESTIONS  # the bound of `cacheblend demo --questions`
    names = {d.name: d.text for d in read_documents(sample_corpus())}
    assert any(len(q.documents) == 2 for q in QUESTIONS) and any(len(q.documents) == 1 for q in QUESTIONS)
    for q in QUESTIONS:
        texts = [names[name] for name in q.documents]
        assert any(q.is_correct(text) for text in texts), q
        if len(q.documents) == 2:  # the question names a fact of one document, the answer is in the other
            assert sum(q.is_correct(text) for text in texts) == 1, q


def test_expected_answer_matches_whole_words_only():
    q = CorpusQuestion("How tall?", "31", ("x.md",))
    assert q.is_correct("It is 31 metres tall.") and q.is_correct("31")
    assert not q.is_correct("born in 1931") and not q.is_correct("3.1 metres") and not q.is_correct("")
    name = CorpusQuestion("Who?", "Ilse Varga", ("x.md",))
    assert name.is_correct("Dr. ilse\nVarga.") and not name.is_correct("Ilse Vargas")
