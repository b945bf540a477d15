"""The store's modules import each other without a cycle, counting imports inside functions (issue 18: urls.py
imported redis_tier.py, which imported urls.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cacheblend_rag"


def local_imports(path: Path) -> set[str]:
    """Modules of ``cacheblend_rag`` that ``path`` imports anywhere (module level or inside a function)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join((*base, node.module)) if node.module else ".".join(base)
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("cacheblend_rag.") and _path(n) is not None}
    return out


def _path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_no_import_cycle_among_the_store_modules():
    modules = [*sorted((PACKAGE / "store").glob("*.py")), PACKAGE / "engine" / "shared_registry.py"]
    names = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in modules}
    names = {n.removesuffix(".__init__"): p for n, p in names.items()}
    graph = {n: {m for m in local_imports(p) if m in names and m != n} for n, p in names.items()}
    cycles = []

    def visit(node, trail):
        for nxt in graph.get(node, ()):
            if nxt in trail:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif len(trail) < len(graph):
                visit(nxt, [*trail, nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, sorted(set(cycles))
