"""The RAG part of `cacheblend demo` on a tiny random model (fast): its table, summary and JSON."""

from __future__ import annotations

import json
import sys

from cacheblend_rag_app.sample_questions import QUESTIONS, summarize
from typer.testing import CliRunner

from cacheblend_rag.cli import app

runner = CliRunner()


def demo(*args) -> str:
    result = runner.invoke(app, ["demo", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_rag_part_table_and_json(tiny_dir, tmp_path):
    out = demo(
        "--model",
        tiny_dir,
        "--dtype",
        "float32",
        "--cache-dir",
        tmp_path,
        "--max-new-tokens",
        3,
        "--questions",
        2,
        "--top-k",
        3,
        "--json",
        tmp_path / "demo.json",
    )
    text = " ".join(out.split())
    for needle in (
        "Strategies on multi-chunk questions",
        "RAG with LlamaIndex",
        "29 chunks indexed",
        "29 computed now, 0 already stored",
        "top 3 chunks per prompt",
        "Median TTFT",
        "How tall is the Greyhook",
        "expected: 31",
        "Who is the curator",
    ):
        assert needle in text, needle
    assert "mayor" not in text  # the third question was not asked

    payload = json.loads((tmp_path / "demo.json").read_text())
    assert len(payload["rows"]) == 12  # the strategy table is still there
    rag = payload["rag"]
    assert rag["chunks"] == 29 and rag["documents"] == 29 and rag["top_k"] == 3 and rag["recompute_ratio"] == 0.15
    rows = rag["rows"]
    assert [(r["question"], r["strategy"]) for r in rows] == [
        (q.question, s) for q in QUESTIONS[:2] for s in ("full_recompute", "cacheblend")
    ]
    for full, blend in zip(rows[::2], rows[1::2]):
        assert full["prompt_tokens"] == blend["prompt_tokens"] > 0 and full["sources"] == blend["sources"]
        assert full["reused_tokens"] == 0 and full["recomputed_tokens"] == full["prompt_tokens"]
        assert 0 < blend["recomputed_tokens"] < blend["prompt_tokens"] and blend["cache_hits"] == 3
        assert blend["reused_tokens"] + blend["recomputed_tokens"] == blend["prompt_tokens"]
        assert all(r["ttft_s"] > 0 and isinstance(r["correct"], bool) for r in (full, blend))
    assert rows[0]["sources"][0] == "greyhook-lighthouse.md"  # MiniLM retrieval over the real corpus
    summary = rag["summary"]
    assert summary["full_recompute"]["reuse_fraction"] == 0 and summary["cacheblend"]["reuse_fraction"] > 0.5
    assert summary["cacheblend"]["questions"] == 2 and summary["speedup"] > 0

    again = " ".join(
        demo(
            "--model",
            tiny_dir,
            "--dtype",
            "float32",
            "--cache-dir",
            tmp_path,
            "--max-new-tokens",
            1,
            "--questions",
            1,
            "--top-k",
            2,
        ).split()
    )
    assert "0 computed now, 29 already stored" in again  # the KV store on disk kept every chunk


def test_demo_without_rag(tiny_dir, tmp_path):
    out = demo(
        "--model",
        tiny_dir,
        "--dtype",
        "float32",
        "--cache-dir",
        tmp_path,
        "--max-new-tokens",
        1,
        "--no-rag",
        "--json",
        tmp_path / "demo.json",
    )
    assert "Strategies on multi-chunk questions" in out and "RAG" not in out
    assert set(json.loads((tmp_path / "demo.json").read_text())) == {"rows"}


def test_summary_counts_agreement_and_speedup():
    def row(question, strategy, answer, ttft, reused, correct):
        return {
            "question": question,
            "strategy": strategy,
            "answer": answer,
            "ttft_s": ttft,
            "prompt_tokens": 100,
            "reused_tokens": reused,
            "correct": correct,
        }

    rows = [
        row("a", "full_recompute", "x", 1.0, 0, True),
        row("a", "cacheblend", "x", 0.25, 80, True),
        row("b", "full_recompute", "y", 3.0, 0, True),
        row("b", "cacheblend", "z", 0.5, 90, False),
    ]
    s = summarize(rows)
    assert s["full_recompute"]["median_ttft_s"] == 2.0 and s["cacheblend"]["median_ttft_s"] == 0.375
    assert abs(s["speedup"] - 2.0 / 0.375) < 1e-12
    assert s["cacheblend"]["reuse_fraction"] == 0.85 and s["full_recompute"]["reuse_fraction"] == 0
    assert s["cacheblend"]["correct"] == 1 and s["full_recompute"]["correct"] == 2
    assert s["same_answer_as_full_recompute"] == 1


def test_demo_without_llama_index_skips_the_rag_part_and_says_what_to_install(tiny_dir, tmp_path, monkeypatch):
    import cacheblend_rag_app

    def missing():
        raise ImportError("the RAG commands need llama_index.core, part of the LlamaIndex integration: pip install x")

    monkeypatch.setattr(cacheblend_rag_app, "require_llama_index", missing)
    out = " ".join(
        demo(
            "--model",
            tiny_dir,
            "--dtype",
            "float32",
            "--cache-dir",
            tmp_path,
            "--max-new-tokens",
            1,
            "--json",
            tmp_path / "demo.json",
        ).split()
    )
    assert "RAG part skipped: the RAG commands need llama_index.core" in out and "pip install x" in out
    assert "Strategies on multi-chunk questions" in out and "Median TTFT" not in out
    assert set(json.loads((tmp_path / "demo.json").read_text())) == {"rows"}


def test_without_the_rag_app_the_demo_skips_its_part_and_ingest_says_what_to_install(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cacheblend_rag_app", None)  # import cacheblend_rag_app raises ImportError
    install = "pip install -e integrations/llama-index-cacheblend -e app (from the repository root)"
    out = demo("--model", tiny_dir, "--dtype", "float32", "--cache-dir", tmp_path, "--max-new-tokens", 1)
    out = " ".join(out.split())
    assert f"RAG part skipped: the RAG commands need the RAG app (missing cacheblend_rag_app): {install}" in out
    assert "Strategies on multi-chunk questions" in out
    for command in (["ingest", str(tmp_path)], ["ask", "How tall?"]):
        result = runner.invoke(app, [*command, "--cache-dir", str(tmp_path)])
        assert result.exit_code == 2 and install in " ".join(result.output.split()), result.output
