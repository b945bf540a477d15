"""Runs ``interpreted.py`` once, in a subprocess with TRITON_INTERPRET=1, and reports each kernel.

The variable must be set before any ``@triton.jit`` function is defined, so it cannot be set inside this
(already running) process. One subprocess serves every check (imports cost seconds); its JUnit report
says which tests passed, and each test below fails with the subprocess's output for its own kernel.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("interpreted.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (Linux x86_64 only)"
)


@pytest.fixture(scope="module")
def interpreted_run(request, tmp_path_factory) -> dict[str, list[tuple[str, str, str]]]:
    """{kernel: [(test name, outcome, message)]} from one interpreted pytest run."""
    try:
        tokenizer_dir = str(request.getfixturevalue("smollm2_dir"))
    except pytest.skip.Exception:
        tokenizer_dir = ""  # the engine checks skip; the kernel checks still run
    report = tmp_path_factory.mktemp("interpreted") / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CACHEBLEND_TEST_TOKENIZER": tokenizer_dir}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HELPER),
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        f"--junitxml={report}",
        f"--basetemp={report.parent / 'tmp'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not report.exists():
        pytest.fail(f"the interpreted run wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    results: dict[str, list[tuple[str, str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message", "") + "\n" + (node.text or ""))
                break
        kernel = name.removeprefix("test_").split("_")[0]
        results.setdefault(kernel, []).append((name, outcome, message))
    results["_output"] = [("", str(proc.returncode), proc.stdout[-4000:] + proc.stderr[-4000:])]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["rope", "deviation", "attention", "decode", "batch", "all"])
def test_kernel_equals_torch_reference_under_the_interpreter(interpreted_run, kernel):
    cases = interpreted_run.get(kernel, [])
    assert cases, f"no interpreted test for {kernel!r} ran:\n{interpreted_run['_output'][0][2]}"
    bad = [f"{name}: {outcome}\n{message}" for name, outcome, message in cases if outcome != "passed"]
    assert not bad, "\n\n".join(bad)


@pytest.mark.slow
def test_no_interpreted_test_failed(interpreted_run):
    """Every test of interpreted.py, whatever its name, passed (the engine ones may skip without SmolLM2)."""
    cases = [case for kernel, group in interpreted_run.items() if kernel != "_output" for case in group]
    assert len(cases) > 100, interpreted_run["_output"][0][2]
    bad = [
        f"{name}: {outcome}\n{message}"
        for name, outcome, message in cases
        if outcome != "passed" and not (outcome == "skipped" and name.startswith("test_engine"))
    ]
    assert not bad, "\n\n".join(bad)
    assert interpreted_run["_output"][0][1] == "0", interpreted_run["_output"][0][2]


@pytest.mark.slow
def test_engine_blended_prefill_triton_equals_torch_under_the_interpreter(interpreted_run):
    cases = interpreted_run.get("engine", [])
    assert cases, f"the engine check did not run:\n{interpreted_run['_output'][0][2]}"
    if all(outcome == "skipped" for _, outcome, _ in cases):
        pytest.skip(cases[0][2].strip())
    bad = [f"{name}: {outcome}\n{message}" for name, outcome, message in cases if outcome != "passed"]
    assert not bad, "\n\n".join(bad)
