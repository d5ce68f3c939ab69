"""The package's layering points one way: ``_core`` depends on nothing above it, and no two subpackages import each
other (read from the source with ``ast``, so lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_xai"


def _imports() -> dict[str, set[str]]:
    """``{subpackage or top-level module: the other ones it imports}``."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        owner = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "lightning_xai" and len(parts) > 1 and parts[1] != owner:
                    edges[owner].add(parts[1])
    return edges


def test_core_depends_on_nothing_above_it():
    assert _imports()["_core"] == set()


def test_no_import_cycles_between_subpackages():
    edges = _imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(owner for owner in edges if owner != "__init__" and reaches(owner, owner, {owner}))
    assert cycles == []
