"""The kernels compile for CUDA sm_90 (H100 / H200) without a GPU, and their default tiles do not spill.

The interpreter runs Python, so it accepts kernels the CUDA compiler rejects; this compiles every kernel
the way a launch on the engine's tensors would (``benchmarks/kernel_registers.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90_and_default_tiles_do_not_spill(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["name"].split()[0] for row in rows} == {"attention", "rotary", "deviation"}
    assert all("error" not in row for row in rows), [row for row in rows if "error" in row]
    if any(row["regs"] == "?" for row in rows):
        pytest.skip("no bundled ptxas could assemble the PTX, so register use is unknown")
    defaults = [row for row in rows if not row["name"].startswith("attention") or row["name"].endswith("default")]
    assert len(defaults) == 3 * 3 + 2 * 3  # attention at 3 head dims, rotary and deviation, in 3 dtypes
    assert [row["name"] for row in defaults if row["spill_bytes"] != 0] == []
    assert all(row["wgmma"] for row in defaults if row["name"].startswith("attention bf16"))  # Hopper tensor cores
