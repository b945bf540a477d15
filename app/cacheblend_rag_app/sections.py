"""Cutting documents into nodes: bounded sections first, then LlamaIndex's sentence splitter.

Documents are first cut into sections of at most ``MAX_SECTION_CHARS`` characters at paragraph, line or
sentence breaks (``split_sections``), so LlamaIndex's sentence splitter never sees one huge text (a 50 MB file
is one "paragraph" to it when its paragraphs are separated by single blank lines); a section NLTK's sentence
tokenizer cannot handle within its time limit is split at sentence ends by a plain regular expression instead.
"""

from __future__ import annotations

import logging
import re
from functools import cache

logger = logging.getLogger(__name__)

MAX_SECTION_CHARS = 50_000  # the most text LlamaIndex's sentence splitter is handed at once

_BREAKS = (re.compile(r"\n[ \t]*\n"), re.compile(r"\n"), re.compile(r"[.!?][\"')\]]*\s"), re.compile(r"\s"))


def split_sections(text: str, max_chars: int = MAX_SECTION_CHARS) -> list[str]:
    """``text`` cut into consecutive sections of at most ``max_chars`` characters ("".join gives ``text`` back):
    after the last blank line in the second half of each window, else the last line break, else the last
    sentence end, else the last space, else at ``max_chars``. Linear in the length of ``text``."""
    if max_chars < 2:
        raise ValueError(f"max_chars must be >= 2, got {max_chars}")
    sections, start = [], 0
    while len(text) - start > max_chars:
        low, high = start + max_chars // 2, start + max_chars
        cut = high
        for pattern in _BREAKS:
            last = None
            for last in pattern.finditer(text, low, high):  # noqa: B007  (keep the last match)
                pass
            if last is not None:
                cut = last.end()
                break
        sections.append(text[start:cut])
        start = cut
    sections.append(text[start:])
    return [s for s in sections if s]


_SPACE = re.compile(r"\s+")


def regex_sentences(text: str) -> list[str]:
    """``text`` cut after every run of whitespace that follows ". ! ?" (and any closing quotes or brackets):
    its sentences, each with the whitespace after it ("".join gives ``text`` back). Linear time."""
    out, start = [], 0
    for space in _SPACE.finditer(text):
        i = space.start() - 1
        while i >= start and text[i] in "\"')]":
            i -= 1
        if i >= start and text[i] in ".!?":
            out.append(text[start : space.end()])
            start = space.end()
    if start < len(text):
        out.append(text[start:])
    return out


@cache
def _punkt():
    from llama_index.core.node_parser.text.utils import split_by_sentence_tokenizer

    return split_by_sentence_tokenizer()


def sentences(text: str) -> list[str]:
    """LlamaIndex's (NLTK punkt) sentence split, or ``regex_sentences`` where punkt fails (its regular
    expressions run under a time limit, and its data may be missing)."""
    try:
        return _punkt()(text)
    except Exception as exc:
        logger.info(
            "NLTK's sentence tokenizer failed on %d characters (%s); splitting at . ! ? instead", len(text), exc
        )
        return regex_sentences(text)


def split_nodes(engine, docs, *, chunk_size: int, chunk_overlap: int, progress: bool = False) -> list:
    """LlamaIndex's SentenceSplitter over ``docs``, each first cut by ``split_sections``; every node keeps its
    document as its source."""
    from llama_index.core import Document
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import NodeRelationship

    splitter = SentenceSplitter(
        chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=engine.tokenize, chunking_tokenizer_fn=sentences
    )
    parts, owner = [], {}
    for doc in docs:
        sections = split_sections(doc.text)
        if len(sections) == 1:
            parts.append(doc)
            continue
        for i, text in enumerate(sections):
            part = Document(
                text=text,
                id_=f"{doc.id_}#section-{i}",
                metadata=dict(doc.metadata),
                excluded_llm_metadata_keys=list(doc.excluded_llm_metadata_keys),
                excluded_embed_metadata_keys=list(doc.excluded_embed_metadata_keys),
            )
            owner[part.id_] = doc
            parts.append(part)
    nodes = splitter(parts, show_progress=progress)
    for node in nodes:
        doc = owner.get(node.ref_doc_id)
        if doc is not None:
            node.relationships[NodeRelationship.SOURCE] = doc.as_related_node_info()
    return nodes
