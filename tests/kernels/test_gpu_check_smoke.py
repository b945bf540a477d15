"""benchmarks/gpu_check.py --smoke: the prepared GPU script still runs end to end (CPU, interpreter, tiny)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_ARGS = ("--smoke", "--no-sweep", "--profile")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_check_smoke_runs_and_every_check_passes(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *SMOKE_ARGS, "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["errors"] == {}
    checks = [row for row in report["rows"] if row["section"] == "check"]
    names = {row["name"] for row in checks}
    expected = {"rotary (in place)", "deviation", "attention, selected 15%", "attention, all queries (full causal)"}
    assert expected <= names
    assert all(row["ok"] for row in checks)
    assert all(row["bitwise_vs_torch"] for row in checks if row["name"].startswith("rotary"))
    prefill = {row["name"]: row for row in report["rows"] if row["section"] == "prefill"}
    assert {"full_recompute triton", "cacheblend 15% triton", "cacheblend 15% torch"} <= set(prefill)
    rows = prefill["cacheblend rows per layer"]
    assert 0 < rows["recomputed"] < int(rows["shape"].removeprefix("N="))  # some rows reused, some recomputed
    assert {"precompute vs HF full"} <= set(prefill)
    assert any(row["section"] == "decode" for row in report["rows"])
    profile = {row["name"]: row for row in report["rows"] if row["section"] == "profile"}
    assert {"full_recompute [store]", "full_reuse [store]", "cacheblend [store]"} <= set(profile)
    assert all(row["wall_ms"] > 0 and row["h2d_MB"] == 0 for row in profile.values())  # CPU: nothing crosses PCIe
