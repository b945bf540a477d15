"""Reading the documents to index: a folder of .txt / .md files, one file, or the bundled sample corpus."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md")


class DocumentError(ValueError):
    """The path to ingest is missing, empty or holds no readable .txt / .md file."""


@dataclass(frozen=True)
class SourceDocument:
    """One file's text. ``doc_id`` (the resolved path) identifies it in the index; ``name`` is for display."""

    doc_id: str
    name: str
    text: str


def sample_corpus() -> Path:
    """The bundled corpus: short documents about Port Merrow, a fictional harbour town (facts no model knows)."""
    return Path(str(resources.files("cacheblend_rag") / "data" / "corpus"))


def read_documents(path: str | Path) -> list[SourceDocument]:
    """Every non-empty .txt / .md file under ``path`` (recursively, hidden entries skipped), or ``path`` itself.

    Files that are not UTF-8 are skipped with a warning. Raises DocumentError when nothing is left to index.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DocumentError(f"{path} does not exist; pass a folder of .txt/.md files or one such file")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DocumentError(f"{path} is not a .txt or .md file; pass a folder of .txt/.md files or one such file")
        files, root = [path], path.parent
    else:
        files = sorted(_text_files(path))
        root = path
        if not files:
            inside = "it is empty" if not any(path.iterdir()) else "it holds no .txt or .md file"
            raise DocumentError(f"nothing to ingest in {path}: {inside}; add .txt/.md files or pass another folder")
    documents, skipped = [], []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError) as exc:
            logger.warning("skipping %s: %s", file, exc)
            skipped.append(f"{file.name} (unreadable: {exc.__class__.__name__})")
            continue
        if not text:
            skipped.append(f"{file.name} (empty)")
            continue
        documents.append(SourceDocument(str(file.resolve()), file.relative_to(root).as_posix(), text))
    if not documents:
        raise DocumentError(
            f"no readable .txt/.md file in {path}: skipped {', '.join(skipped)}; files must be non-empty UTF-8 text"
        )
    return documents


def _text_files(folder: Path):
    for item in folder.rglob("*"):
        if any(part.startswith(".") for part in item.relative_to(folder).parts):
            continue
        if item.is_file() and item.suffix.lower() in SUFFIXES:
            yield item
