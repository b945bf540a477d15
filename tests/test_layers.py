"""Dependencies point one way: the core (cacheblend_rag) <- the integrations <- the RAG app (app/)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABOVE_THE_CORE = ("llama_index", "langchain", "langchain_core", "langchain_cacheblend", "cacheblend_rag_app")
# the only core modules that reach above the core: the CLI commands that run the RAG app, inside functions
LAZY_RAG_APP = {"cacheblend_rag/cli/rag.py", "cacheblend_rag/cli/demo.py"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level) for every import statement in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, id(node) in top))
    return out


def test_the_core_never_imports_an_integration_or_the_app():
    offenders = []
    for path in sorted((REPO / "cacheblend_rag").rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        for module, top_level in imports(path):
            if module.split(".")[0] not in ABOVE_THE_CORE:
                continue
            if name in LAZY_RAG_APP and module.startswith("cacheblend_rag_app") and not top_level:
                continue
            offenders.append(f"{name}: {module}")
    assert not offenders, offenders


def test_the_integrations_never_import_the_app():
    paths = [*(REPO / "integrations").rglob("*.py")]
    offenders = [
        f"{p.relative_to(REPO)}: {m}" for p in paths for m, _ in imports(p) if m.startswith("cacheblend_rag_app")
    ]
    assert not offenders, offenders


BLOCKED = """
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked", name=name)
        return None

sys.meta_path.insert(0, Block())
import cacheblend_rag
for info in pkgutil.walk_packages(cacheblend_rag.__path__, "cacheblend_rag."):
    importlib.import_module(info.name)
from typer.main import get_command
from cacheblend_rag.cli import app
commands = sorted(get_command(app).commands)
print(" ".join(commands))
"""


def test_the_core_and_its_cli_import_with_llama_index_and_langchain_blocked():
    script = textwrap.dedent(BLOCKED.format(blocked=set(ABOVE_THE_CORE)))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {"ask", "demo", "ingest", "serve"} <= set(out.stdout.split()), out.stdout
