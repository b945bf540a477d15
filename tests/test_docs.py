"""What the documentation must say: the store's integrity guarantees and their limits; numbers with their provenance."""

import re
from pathlib import Path

STORE_MD = Path(__file__).resolve().parents[1] / "docs" / "STORE.md"


def test_store_docs_say_checksums_guard_integrity_not_authenticity():
    text = " ".join(STORE_MD.read_text().split())
    assert "**Integrity, not authenticity.**" in text
    assert "CRC32 is not a signature" in text
    assert "whoever can write the disk tier's folder or the Redis database can put well-formed KV" in text
    assert "keep the disk folder writable only by the accounts that run the engine" in text
    assert "give Redis a password" in text


REPO = Path(__file__).resolve().parents[1]
HISTORY = re.compile(r"\b(issues? \d+|(earlier|latest|this|previous|that) session)\b", re.IGNORECASE)


def test_docs_and_tests_say_what_holds_not_where_it_came_from():
    """Numbers carry their hardware, commit and command, and tests the case they guard: no issue numbers or
    sessions, which a reader of the repository cannot look up."""
    paths = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "integrations").glob("*/README.md")]
    paths += [*(REPO / "tests").rglob("*.py"), *(REPO / "integrations").rglob("tests/**/*.py")]
    offenders = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in paths
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert offenders == []


def test_the_kernels_doc_and_the_benchmarks_agree_on_the_h200_run():
    kernels = " ".join((REPO / "docs" / "KERNELS.md").read_text().split())
    benchmarks = " ".join((REPO / "docs" / "BENCHMARKS.md").read_text().split())
    for text in (kernels, benchmarks):
        assert "NVIDIA H200, torch 2.11, Triton 3.6" in text and "`b6bbf06`" in text and "4.55x" in text
    assert "never run on a GPU" not in kernels
