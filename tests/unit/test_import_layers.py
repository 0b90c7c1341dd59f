"""Imports flow one way: no package imports one above it (docs/architecture.md, "Packages").

Read from the source with `ast`, so function-level (lazy) imports count as much as module-level
ones: a lazy import upward is still a dependency a newcomer must know about.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# What each first-party package may import (besides itself). `common` is the bottom: logging, the
# data-dir layout and lock, which every process needs; `duet` (the CLI) is the top.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "encoders": {"common"},
    "registry": {"common", "encoders"},
    "index": {"common"},
    "trainer": {"common", "encoders", "registry"},
    "jobs": {"common", "trainer", "registry", "encoders"},
    "service": {"common", "encoders", "registry", "index", "jobs", "trainer"},
    "duet": {"common", "encoders", "registry", "index", "jobs", "trainer", "service"},
}
# Narrower rules inside an allowed arrow: the service uses only the trainer's config model (to type
# POST /v1/jobs), never the training stack; the registry only the light parts of encoders.
ONLY: dict[tuple[str, str], set[str]] = {
    ("service", "trainer"): {"trainer.config"},
    ("registry", "encoders"): {"encoders.contract", "encoders.hashing"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations() -> list[str]:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in _imports(path):
                top = module.split(".")[0]
                if top == package or top not in ALLOWED:
                    continue
                where = f"{path.relative_to(REPO)}:{line} imports {module}"
                if top not in allowed:
                    problems.append(f"{where} ({package} may import {sorted(allowed) or 'nothing of ours'})")
                elif (package, top) in ONLY and not any(
                    module == m or module.startswith(m + ".") for m in ONLY[(package, top)]
                ):
                    problems.append(f"{where} ({package} may import only {sorted(ONLY[(package, top)])} of {top})")
    return problems


def test_every_package_is_in_the_layer_table():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench", "docs"}
    assert packages == set(ALLOWED), "add the new package to ALLOWED (and docs/architecture.md)"


def test_no_package_imports_upward():
    problems = _violations()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_the_table_has_no_cycles(package):
    """The table itself is a strict order: following its arrows never leads back."""
    seen, stack = set(), [(package, (package,))]
    while stack:
        current, trail = stack.pop()
        for nxt in ALLOWED[current]:
            assert nxt != package, f"cycle: {' -> '.join((*trail, nxt))}"
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, (*trail, nxt)))
