"""Evaluation data: a folder of documents with its questions loads as the bundled town does; bad folders are
clear errors naming the file and the fix."""

import json

import pytest

from cacheblend_rag.eval.datasets import DataError, load_examples, town_examples


def corpus_folder(root, questions, documents=12):
    (root / "corpus").mkdir(parents=True)
    for i in range(documents):
        (root / "corpus" / f"doc-{i:02d}.md").write_text(f"# Document {i}\n\nFact number {i} is {100 + i}.\n")
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    return root


QUESTIONS = [
    {"question": "What is fact number 3?", "answers": ["103"], "documents": ["doc-03.md"]},
    {"question": "Fact 1 names which fact?", "answers": ["105"], "documents": ["doc-01.md", "doc-05.md"]},
]


def test_corpus_folder_loads_questions_among_distractors(tmp_path):
    examples = load_examples(corpus_folder(tmp_path, QUESTIONS))
    assert [e.question for e in examples] == [q["question"] for q in QUESTIONS]
    assert [e.gold_passages for e in examples] == [1, 2]
    for e, q in zip(examples, QUESTIONS):
        assert len(e.passages) == 10 and len(set(e.passages)) == 10  # its documents and 8-9 distinct distractors
        for name in q["documents"]:
            text = (tmp_path / "corpus" / name).read_text().strip() + "\n\n"
            assert text in e.passages
    again = load_examples(tmp_path)  # seeded per question: the same prompts every run
    assert [e.passages for e in again] == [e.passages for e in examples]
    assert len(load_examples(tmp_path, 1)) == 1


def test_bundled_town_is_a_corpus_folder_of_its_own():
    examples = town_examples()
    assert len(examples) == 32 and {e.gold_passages for e in examples} == {1, 2}
    assert all(len(e.passages) == 10 for e in examples)


@pytest.mark.parametrize(
    "questions, documents, message",
    [
        ([{"question": "q", "answers": ["a"], "documents": ["nope.md"]}], 12, "lacks: nope.md"),
        ([{"question": "q", "answers": ["a"]}], 12, "it needs"),
        (QUESTIONS, 8, "holds 8 .md documents; a prompt needs 10"),
        ([{"question": "", "answers": ["a"], "documents": ["doc-01.md"]}], 12, "non-empty string"),
        ([{"question": "q", "answers": ["a"], "documents": []}], 12, "must name 1 to 10 files"),
    ],
)
def test_bad_corpus_folder_is_a_clear_error(tmp_path, questions, documents, message):
    with pytest.raises(DataError, match=message):
        load_examples(corpus_folder(tmp_path, questions, documents))


def test_questions_file_that_is_not_json_is_a_clear_error(tmp_path):
    corpus_folder(tmp_path, QUESTIONS)
    (tmp_path / "questions.json").write_text("{not json")
    with pytest.raises(DataError, match="not a questions file"):
        load_examples(tmp_path)
