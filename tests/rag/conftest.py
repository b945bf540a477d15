"""Fixtures of the RAG app tests: a small folder of documents, one torch thread (``tiny_dir``, the tiny model
folder, comes from the cacheblend_rag.testing plugin)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

DOCUMENTS = {
    "lighthouse.md": "# Brannock Light\n\nThe Brannock Light was first lit in 1893. Its tower is 44 metres tall and "
    "its lamp can be seen 19 nautical miles out at sea.",
    "notes/ferry.txt": "The ferry Little Heron leaves Quay 5 at 08:15 every morning. The crossing to Tern Island "
    "takes 40 minutes.",
    "bakery.md": "The Salt Loaf bakery on Rope Walk opens at 06:30. Its best-known bread is a seaweed rye.",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """These tests run their models on one torch thread (cacheblend_rag.testing.one_torch_thread)."""


@pytest.fixture
def docs_dir(tmp_path):
    """Three short documents (one in a subfolder, one .txt), plus files that must be ignored."""
    root = tmp_path / "docs"
    for name, text in DOCUMENTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "image.png").write_bytes(b"\x89PNG\r\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.md").write_text("not to be indexed")
    return root
