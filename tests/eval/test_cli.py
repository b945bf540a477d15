"""Every `cacheblend` command on a tiny model and tiny data, output checked."""

import json

import pytest
from typer.testing import CliRunner

from cacheblend_rag.cli import app
from tests.conftest import PASSAGES

runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    items = [
        {
            "ctxs": [{"title": "", "text": p} for p in PASSAGES],
            "question": "Which river reaches the Black Sea",
            "answers": ["Danube"],
        },
        {
            "ctxs": [{"title": "Mountains", "text": p} for p in reversed(PASSAGES)],
            "question": "Highest in Africa?",
            "answers": ["Kilimanjaro"],
        },
    ]
    path = tmp_path_factory.mktemp("data") / "tiny.json"
    path.write_text(json.dumps(items))
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def common(tiny_dir, tmp_path):
    return ["--model", tiny_dir, "--dtype", "float32", "--cache-dir", tmp_path]


def test_demo_prints_every_strategy(tiny_dir, tmp_path):
    out = invoke(
        "demo", *common(tiny_dir, tmp_path), "--max-new-tokens", 4, "--no-rag", "--json", tmp_path / "demo.json"
    )
    for name in ("full_recompute", "prefix_cache", "full_reuse", "cacheblend", "TTFT ms", "Messi or Ronaldo"):
        assert name in out
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert len(rows) == 12 and {r["strategy"] for r in rows} == {
        "full_recompute",
        "prefix_cache",
        "full_reuse",
        "cacheblend",
    }
    assert all(r["reused_tokens"] + r["recomputed_tokens"] == r["prompt_tokens"] for r in rows)
    assert all(r["reused_tokens"] == 0 for r in rows if r["strategy"] == "full_recompute")
    assert all(r["reused_tokens"] > 0 for r in rows if r["strategy"] in ("full_reuse", "cacheblend"))


def test_bench_ttft_json(tiny_dir, data_file, tmp_path):
    out = invoke(
        "bench", "ttft", "--data", data_file, "--n", 2, *common(tiny_dir, tmp_path), "--out", tmp_path / "ttft.json"
    )
    assert "speedup" in out and "cacheblend[query]" in out and "cacheblend[deviation]" in out  # names printed
    result = json.loads((tmp_path / "ttft.json").read_text())
    assert [s["strategy"] for s in result["summary"]] == [
        "full_recompute",
        "prefix_cache",
        "full_reuse",
        "cacheblend[query]",
        "cacheblend[deviation]",
    ]
    assert len(result["rows"]) == 10
    deviation = [r for r in result["rows"] if r["strategy"] == "cacheblend[deviation]"]
    assert all(r["recomputed_tokens"] < r["prompt_tokens"] for r in deviation)
    for s in result["summary"]:
        assert s["median_ttft_s"] > 0 and s["flop_speedup"] > 0 and 0 < s["recomputed_fraction"] <= 1
    # these prompts are mostly uncached text, which the query selection's probe pass computes twice
    assert next(s for s in result["summary"] if s["strategy"] == "full_reuse")["flop_speedup"] > 1.0
    full = next(s for s in result["summary"] if s["strategy"] == "full_recompute")
    assert full["speedup"] == pytest.approx(1.0) and full["recomputed_fraction"] == 1.0


def test_eval_json_keys_and_ranges(tiny_dir, data_file, tmp_path):
    out_file = tmp_path / "eval.json"
    out = invoke(
        "eval",
        "--data",
        data_file,
        "--n",
        2,
        "--ratios",
        "0.15,1",
        "--max-new-tokens",
        8,
        "--selections",
        "deviation,query",
        "--targets",
        "0.5",
        "--context",
        0,
        *common(tiny_dir, tmp_path),
        "--out",
        out_file,
    )
    assert "top-1 agree" in out and "cacheblend[query]@0.15" in out  # labels printed as written
    result = json.loads(out_file.read_text())
    assert set(result) == {"config", "examples", "summary"}
    labels = [s["config"] for s in result["summary"]]
    assert labels == [
        "full_recompute",
        "prefix_cache",
        "full_reuse",
        "cacheblend[deviation]@0.15",
        "cacheblend[deviation]@1",
        "cacheblend[deviation]~0.5",
        "cacheblend[query]@0.15",
        "cacheblend[query]@1",
        "cacheblend[query]~0.5",
    ]
    for row in result["examples"]:
        for key in ("gold_f1", "gold_em", "answer_em_vs_full", "rouge_l_vs_full", "top1_agreement"):
            assert 0.0 <= row[key] <= 1.0
        assert row["kl"] >= 0 and row["ttft_s"] > 0
    by = {s["config"]: s for s in result["summary"]}
    assert by["full_recompute"]["top1_agreement"] == 1.0 and by["full_recompute"]["kl"] == 0.0
    for label in ("cacheblend[deviation]@1", "cacheblend[query]@1"):
        assert by[label]["top1_agreement"] == 1.0 and by[label]["kl"] < 1e-6 and by[label]["answer_em_vs_full"] == 1.0
        assert by[label]["recompute_ratio"] == 1.0
    assert by["cacheblend[query]@0.15"]["selection"] == "query"
    assert by["cacheblend[deviation]@0.15"]["selection"] == "deviation"
    for label in ("cacheblend[deviation]~0.5", "cacheblend[query]~0.5"):
        assert by[label]["fidelity_target"] == 0.5 and 0.02 <= by[label]["recompute_ratio"] <= 0.5

    plots = tmp_path / "plots"
    invoke("plot", out_file, "--out-dir", plots)
    pngs = sorted(plots.glob("*.png"))
    assert [p.name for p in pngs] == ["quality_vs_ratio.png", "quality_vs_ttft.png", "ttft_vs_ratio.png"]
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[0] > 100


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data file not found"),
        ("{not json", "is not valid JSON"),
        ('{"a": 1}', "must hold a non-empty JSON list"),
        ('[{"ctxs": [], "question": "q", "answers": ["a"]}]', "example 0: 'ctxs' must be a non-empty list"),
        ('[{"question": "q"}]', "missing field"),
    ],
)
def test_eval_bad_data_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["eval", "--data", str(path), "--n", "1"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert message in text and "data.json" in text


def test_bench_sweep_and_plot(tiny_dir, data_file, tmp_path):
    out_file = tmp_path / "sweep.json"
    invoke(
        "bench",
        "sweep",
        "--data",
        data_file,
        "--n",
        1,
        "--chunks",
        "1,3",
        "--ratios",
        "0,0.5",
        *common(tiny_dir, tmp_path),
        "--out",
        out_file,
    )
    result = json.loads(out_file.read_text())
    assert {r["chunks"] for r in result["ttft_vs_chunks"]} == {1, 3}
    assert [r["ratio"] for r in result["ttft_vs_ratio"]] == [0.0, 0.5]
    assert {(r["tier"], r["strategy"]) for r in result["ttft_by_tier"]} == {
        ("memory", "full_reuse"),
        ("memory", "cacheblend"),
        ("disk", "full_reuse"),
        ("disk", "cacheblend"),
    }
    invoke("plot", out_file, "--out-dir", tmp_path / "plots")
    assert (tmp_path / "plots" / "ttft_sweeps.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_rejects_bad_input(tmp_path):
    result = runner.invoke(app, ["plot", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "not found" in result.output
    (tmp_path / "x.json").write_text('{"rows": []}')
    result = runner.invoke(app, ["plot", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "nothing to plot" in result.output


def test_store_stats_and_gc(tiny_dir, tmp_path):
    invoke("demo", *common(tiny_dir, tmp_path), "--max-new-tokens", 2)
    stats = json.loads(invoke("store", "stats", "--cache-dir", tmp_path, "--json"))
    assert stats["entries"] > 0 and stats["bytes"] > 0 and stats["models"][0]["entries"] == stats["entries"]
    out = invoke("store", "gc", "--max-bytes", "0", "--cache-dir", tmp_path)
    assert "removed" in out
    assert json.loads(invoke("store", "stats", "--cache-dir", tmp_path, "--json"))["entries"] == 0
    bad = runner.invoke(app, ["store", "gc", "--max-bytes", "lots"])
    assert bad.exit_code != 0 and "byte size" in bad.output


def test_eval_unknown_selection_is_a_clear_error(data_file):
    result = runner.invoke(app, ["eval", "--data", str(data_file), "--n", "1", "--selections", "deviation,bogus"])
    assert result.exit_code == 2
    assert "selection must be one of" in " ".join(result.output.split())


def test_eval_reports_partial_results_after_each_example(tiny_dir, data_file, tmp_path):
    """A long eval hands its result so far to ``on_example`` after every example but the last."""
    from cacheblend_rag import CacheBlendEngine
    from cacheblend_rag.eval.datasets import load_examples
    from cacheblend_rag.eval.runner import eval_configs, evaluate

    engine = CacheBlendEngine.from_pretrained(tiny_dir, dtype="float32", cache_dir=tmp_path, store=["memory://"])
    examples = load_examples(data_file, 2)
    configs = eval_configs(["full_recompute", "full_reuse"], [], [], [])
    seen = []
    result = evaluate(engine, examples, configs, max_new_tokens=2, on_example=seen.append)
    assert len(seen) == 1 and seen[0]["partial"] is True and seen[0]["config"]["n"] == 1
    assert [r["example"] for r in seen[0]["examples"]] == [0, 0]
    assert "partial" not in result and result["config"]["n"] == 2 and len(result["examples"]) == 4
