"""The GPU scripts: ``gpu_check.py --smoke`` (kernel_check.py and prefill_check.py in one run) still runs end to
end on the CPU under Triton's interpreter at tiny shapes, and importing the scripts does nothing until ``main``."""

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


GPU_SCRIPTS = ("gpu_check", "kernel_check", "prefill_check", "kernel_registers")
IMPORT_THEN_HELP = """
import contextlib, io, os, sys
sys.argv = ["gpu_check.py", "--smoke"]
sys.path.insert(0, "benchmarks")
import gpu_common, gpu_profile, {scripts}
print(os.environ.get("TRITON_INTERPRET"), "triton" in sys.modules, "cacheblend_rag" in sys.modules)
for script in ({scripts},):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        script.main(["--help"])
    print(script.__name__, "--out" in out.getvalue())
"""


def test_the_gpu_scripts_do_nothing_at_import_and_each_has_a_main_with_its_options():
    """Only ``main`` reads arguments, turns the interpreter on and imports Triton and the package."""
    script = IMPORT_THEN_HELP.format(scripts=", ".join(GPU_SCRIPTS))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=99)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["None", "False", "False"]
    assert lines[1:] == [f"{name} True" for name in GPU_SCRIPTS]
