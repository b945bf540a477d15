"""The store benchmarks on a tiny model: every tier variant serves every chunk, the JSON has the numbers."""

import json

import pytest
from typer.testing import CliRunner

import cacheblend_rag.cli.bench_store  # noqa: F401  (registers bench tiers / compress)
from cacheblend_rag.cli import app
from cacheblend_rag.eval.tiers import VARIANTS
from tests.conftest import PASSAGES

runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    items = [
        {"ctxs": [{"title": "", "text": p} for p in PASSAGES], "question": "Which river?", "answers": ["Nile"]},
        {
            "ctxs": [{"title": "T", "text": p} for p in reversed(PASSAGES)],
            "question": "Highest?",
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


def test_bench_tiers_every_variant(tiny_dir, data_file, tmp_path, redis_base_url):
    model = ["--model", tiny_dir, "--dtype", "float32", "--cache-dir", tmp_path]
    out = invoke(
        "bench",
        "tiers",
        "--data",
        data_file,
        "--n",
        2,
        "--repeats",
        2,
        "--tiers",
        ",".join(VARIANTS),
        "--strategies",
        "cacheblend,full_reuse",
        "--redis",
        redis_base_url,
        "--slow-mbps",
        50,
        *model,
        "--out",
        tmp_path / "t.json",
    )
    assert "vs memory" in out and "disk-slow-sync" in out
    result = json.loads((tmp_path / "t.json").read_text())
    assert {(s["tier"], s["strategy"]) for s in result["summary"]} == {
        (t, s) for t in VARIANTS for s in ("cacheblend", "full_reuse")
    }
    assert all(s["misses"] == 0 and s["requests"] == 4 for s in result["summary"])  # every chunk was a hit
    assert all(r["cache_hits"] == len(PASSAGES) for r in result["rows"])
    memory = [s for s in result["summary"] if s["tier"] == "memory"]
    assert all(s["vs_memory"] == 1.0 for s in memory)


def test_bench_tiers_rejects_unknown_tiers_and_redis_without_url(tiny_dir, data_file, tmp_path):
    for tiers, message in (("memory,tape", "unknown tier variants"), ("memory,redis", "need --redis")):
        args = [
            "bench",
            "tiers",
            "--data",
            data_file,
            "--n",
            1,
            "--tiers",
            tiers,
            "--model",
            tiny_dir,
            "--dtype",
            "float32",
            "--cache-dir",
            tmp_path,
        ]
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code != 0 and message in result.output


def test_bench_compress(tiny_dir, data_file, tmp_path):
    out = invoke(
        "bench",
        "compress",
        "--data",
        data_file,
        "--n",
        1,
        "--max-new-tokens",
        4,
        "--model",
        tiny_dir,
        "--dtype",
        "float32",
        "--cache-dir",
        tmp_path,
        "--store-dtypes",
        "float16,int8",
        "--out",
        tmp_path / "c.json",
    )
    assert "int8 relative RMS error" in out
    result = json.loads((tmp_path / "c.json").read_text())
    rows = {(s["store_dtype"], s["config"]): s for s in result["summary"]}
    assert set(rows) == {(d, c) for d in ("float16", "int8") for c in ("cacheblend@0.15", "full_reuse")}
    # head_dim 16 here: a float32 value scale per token and head adds 4 bytes to 16 (0.625x before headers)
    assert rows["int8", "full_reuse"]["bytes_per_token"] < 0.72 * rows["float16", "full_reuse"]["bytes_per_token"]
    assert 0 < result["int8_error"]["k_relative_rms"] < 0.05 and 0 < result["int8_error"]["v_relative_rms"] < 0.05
