"""kvtransfer/_core.pyi describes the compiled module: every public name of _core is in the
stubs and vice versa (regenerate with `make stubs`)."""

from __future__ import annotations

import ast
from pathlib import Path

from kvtransfer import _core

STUBS = Path(__file__).resolve().parent.parent / "kvtransfer" / "_core.pyi"


def _stub_names() -> set[str]:
    tree = ast.parse(STUBS.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def test_stubs_cover_exactly_the_compiled_module():
    compiled = {n for n in dir(_core) if not n.startswith("_")}
    stubs = _stub_names()
    assert compiled - stubs == set(), "names missing from _core.pyi: run `make stubs`"
    assert stubs - compiled == set(), "stale names in _core.pyi: run `make stubs`"
