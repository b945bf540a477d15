"""Every ``cacheblend`` command runs torch with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

libgomp (torch's OpenMP on Linux) reads the variable once, when torch loads, so the command must set it before
anything imports torch, including ``import cacheblend_rag``. The check runs what the installed ``cacheblend``
script runs, in a fresh process, and reads the policy libgomp itself reports (``OMP_DISPLAY_ENV=VERBOSE``): with
PASSIVE its spin count is 0; unset, libgomp spins 300000 times before sleeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = """
import sys
import cacheblend_rag
print("torch loaded by import cacheblend_rag:", "torch" in sys.modules)
from cacheblend_rag.cli import main   # the console script's import, then its call
sys.argv = ["cacheblend", "store", "--help"]
try:
    main()
except SystemExit:
    pass
import torch
torch.ones(1 << 16).sum()  # a parallel region: libgomp is running
"""


def run_command(policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    if "OPENMP DISPLAY ENVIRONMENT" not in out.stderr:
        pytest.skip("torch's OpenMP here is not libgomp (it does not report its settings)")
    return out.stdout + out.stderr


def test_the_command_sets_a_passive_wait_policy_before_torch_loads():
    report = run_command(None)
    assert "torch loaded by import cacheblend_rag: False" in report
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in report and "GOMP_SPINCOUNT = '0'" in report, report[-2000:]


def test_a_policy_the_user_set_is_kept():
    report = run_command("ACTIVE")
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in report, report[-2000:]
