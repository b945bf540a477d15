"""Dependencies point one way: the core (cacheblend_rag) <- the integrations <- the RAG app (app/); no import cycles."""

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


# ---- import cycles ---------------------------------------------------------------------------------------------
SOURCES = {  # where each top-level package lives
    "cacheblend_rag": REPO,
    "cacheblend_rag_app": REPO / "app",
    "langchain_cacheblend": REPO / "integrations" / "langchain-cacheblend",
    "llama_index": REPO / "integrations" / "llama-index-cacheblend",
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages in SOURCES."""
    out = {}
    for package, root in SOURCES.items():
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``files`` it imports anywhere in its source (inside functions too): ``import a.b``
    and ``from a import b`` name a.b if it is a module, else a; relative imports resolved."""
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def cycle_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports that lie on a cycle: edges inside a strongly connected component (Tarjan, iteratively)."""
    index, low, component, stack, on_stack, counter = {}, {}, {}, [], set(), 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component[member] = node
                    if member == node:
                        break
    return {(a, b) for a in graph for b in graph[a] if component[a] == component[b]}


def test_import_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph(module_files())
    assert "cacheblend_rag.store.redis_tier" in graph["cacheblend_rag.store.urls"]  # inside a function
    assert "cacheblend_rag.store.tier" in graph["cacheblend_rag.store.memory"]  # from .tier import TierStats
    assert "cacheblend_rag.config" in graph["cacheblend_rag.engine.engine"]  # from ..config import BlendConfig
    assert "cacheblend_rag_app" in graph["cacheblend_rag.cli.rag"]  # lazily, inside the command
    assert cycle_edges({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == {("a", "b"), ("b", "c"), ("c", "a")}


def test_no_import_cycle():
    """No module imports, directly or through others, a module that imports it back (imports inside functions
    count: they run sooner or later)."""
    edges = {
        (a.removeprefix("cacheblend_rag."), b.removeprefix("cacheblend_rag."))
        for a, b in cycle_edges(import_graph(module_files()))
    }
    assert edges == set(), f"import cycle through these imports: {sorted(edges)}"


def test_the_cli_runs_as_a_module_too():
    out = subprocess.run(
        [sys.executable, "-m", "cacheblend_rag.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr[-2000:]
