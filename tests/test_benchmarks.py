"""The benchmark scripts are not run by the suite (they take minutes), so check that every
histoduo name they import still exists: a rename in the library must not leave them broken."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def _histoduo_imports(path: Path) -> list[tuple[str, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("histoduo"):
            names += [(node.module, alias.name) for alias in node.names]
    return names


def test_benchmarks_found() -> None:
    assert len(BENCHMARKS) >= 10


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_imports_exist(path: Path) -> None:
    missing = []
    for module_name, name in _histoduo_imports(path):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"{path.name} imports names histoduo no longer has: {missing}"


def test_check_finds_a_missing_name(tmp_path: Path) -> None:
    script = tmp_path / "bench_x.py"
    script.write_text("def f():\n    from histoduo.tiling.read import no_such_reader\n")
    with pytest.raises(AssertionError, match="no_such_reader"):
        test_benchmark_imports_exist(script)
