"""The server's code stays readable: no function in cacheblend_rag/serve longer than 100 lines, and no import
cycle between its modules (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).resolve().parents[2] / "cacheblend_rag" / "serve"
PACKAGE = "cacheblend_rag.serve"


def test_no_function_is_longer_than_100_lines():
    long = []
    for path in sorted(SERVE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def module_imports(path: Path) -> set[str]:
    """The cacheblend_rag.serve modules ``path`` imports, anywhere in it."""
    name = f"{PACKAGE}.{path.stem}" if path.stem != "__init__" else PACKAGE
    package = PACKAGE
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if (SERVE / f"{t.removeprefix(PACKAGE + '.')}.py").exists() or t == PACKAGE}
    out.discard(name)
    return out


def test_no_import_cycle_in_the_server():
    graph = {
        (f"{PACKAGE}.{p.stem}" if p.stem != "__init__" else PACKAGE): module_imports(p) for p in SERVE.glob("*.py")
    }

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}
    assert graph[f"{PACKAGE}.app"] >= {f"{PACKAGE}.completions", f"{PACKAGE}.chunks"}  # the graph is read
