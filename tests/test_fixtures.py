"""The fixtures the test suites share are defined once, in the cacheblend_rag.testing plugin."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = {"smollm2_dir", "tokenizer", "passages", "tiny_dir", "one_torch_thread"}
# a module that runs in a subprocess of its own and overrides a shared fixture on purpose
OVERRIDES = {("tests/kernels/interpreted.py", "tokenizer")}


def definitions(path: Path) -> list[str]:
    """Names of the pytest fixtures defined in ``path`` and of the module-level ``PASSAGES`` assignments."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list):
            names.append(node.name)
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name) and t.id == "PASSAGES"]
    return names


def test_shared_fixtures_and_passages_are_defined_only_in_the_plugin():
    paths = [*(REPO / "tests").rglob("*.py"), *(REPO / "integrations").rglob("*.py"), REPO / "conftest.py"]
    offenders = sorted(
        f"{name}: {path.relative_to(REPO).as_posix()}"
        for path in paths
        for name in definitions(path)
        if name in SHARED | {"PASSAGES"} and (path.relative_to(REPO).as_posix(), name) not in OVERRIDES
    )
    assert offenders == []
    assert SHARED | {"PASSAGES"} <= set(definitions(REPO / "cacheblend_rag" / "testing.py"))


def test_importing_the_library_imports_neither_pytest_nor_the_plugin():
    script = (
        "import sys, cacheblend_rag\n"
        "from cacheblend_rag import CacheBlendEngine, KVStore\n"
        "print('pytest' in sys.modules, 'cacheblend_rag.testing' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False"]
