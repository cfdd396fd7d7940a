"""Imports point one way: every import statement of every module, read with ast, stays in its layer.

fedocr imports neither side; recognizer knows nothing of the wire; the aggregator never imports torch
or recognizer; aggregator and edge_agent never import each other. (tests/aggregator/test_process.py
checks the same of a running aggregator's sys.modules.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "fedocr": ("aggregator", "edge_agent", "recognizer", "experiments", "benchmarks", "torch"),
    "recognizer": ("aggregator", "edge_agent", "recognition_service", "experiments", "benchmarks", "grpc",
                   "fedocr.v1"),
    "aggregator": ("edge_agent", "recognizer", "torch", "experiments", "benchmarks"),
    "edge_agent": ("aggregator", "experiments", "benchmarks"),
}


def imported_names(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``source`` imports, anywhere in it, relative imports resolved.

    ``package`` is the dotted package the module sits in; ``from a import b`` yields both ``a`` and
    ``a.b`` (b may be a submodule).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def violations(package_dir: str) -> list[str]:
    """``path:line imports name`` for each import in ``package_dir`` that FORBIDDEN rules out."""
    banned = FORBIDDEN[package_dir]
    out = []
    for path in sorted((ROOT / package_dir).rglob("*.py")):
        rel = path.relative_to(ROOT)
        package = rel.parent.parts
        for line, name in imported_names(path.read_text(), package):
            if any(name == b or name.startswith(b + ".") for b in banned):
                out.append(f"{rel}:{line} imports {name}")
    return out


@pytest.mark.parametrize("package_dir", sorted(FORBIDDEN))
def test_no_import_runs_back_up_a_layer(package_dir: str) -> None:
    modules = list((ROOT / package_dir).rglob("*.py"))
    assert len(modules) >= 5, f"{package_dir}: too few modules found under {ROOT}"
    assert violations(package_dir) == []


def test_the_reader_sees_lazy_relative_and_from_imports() -> None:
    source = (
        "import os\n"
        "def f():\n"
        "    import torch.nn as nn\n"
        "from . import sibling\n"
        "from ..v1 import federation_pb2\n"
        "from fedocr import v1\n"
    )

    names = [name for _, name in imported_names(source, ("fedocr", "harness"))]

    assert "torch.nn" in names
    assert "fedocr.harness.sibling" in names
    assert "fedocr.v1.federation_pb2" in names
    assert "fedocr.v1" in names and "os" in names
