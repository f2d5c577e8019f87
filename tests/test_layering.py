"""The layers import downwards only, read from the installed package's sources.

``vspan`` (the core: codecs, batches, capture files, inventory, kernels, synthetic traffic)
imports none of the sides; a collector imports neither the analyzer, the API nor pandas (a
collector host installs ``vspan[collector]``); the analyzer imports neither the API nor the
collectors; the wire codecs do no I/O. Only the command line (``vspan.cli``) and the demo's
simulator wire the sides together. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vspan

PACKAGE = Path(vspan.__file__).resolve().parent


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(["vspan", *parts]), path


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


MODULES = dict(_modules())

# (what, modules it applies to, imports it may not make, modules exempt and why)
RULES = [
    ("the core imports no side", lambda m: not m.startswith(
        ("vspan.analysis", "vspan.collectors", "vspan.api", "vspan.cli")),
     ("vspan.analysis", "vspan.collectors", "vspan.api", "vspan.cli")),
    ("a collector imports neither the analyzer, the API nor pandas",
     lambda m: m.startswith("vspan.collectors") and not m.startswith(
         "vspan.collectors.simulator"),
     ("vspan.analysis", "vspan.api", "pandas", "pyarrow", "duckdb", "fastapi")),
    ("the analyzer imports neither the API nor the collectors",
     lambda m: m.startswith("vspan.analysis"), ("vspan.api", "vspan.collectors")),
    ("the wire codecs do no I/O", lambda m: m.startswith("vspan.wire"),
     ("socket", "select", "os", "io", "pathlib", "threading")),
]  # fmt: skip


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(("what", "applies", "banned"), RULES, ids=[r[0] for r in RULES])
def test_imports_point_downwards(what: str, applies: object, banned: tuple[str, ...]) -> None:
    assert callable(applies)
    wrong = {
        module: sorted(i for i in _imports(path) if any(_is(i, b) for b in banned))
        for module, path in MODULES.items()
        if applies(module)
    }
    wrong = {m: found for m, found in wrong.items() if found}
    assert wrong == {}, f"{what}: " + "; ".join(
        f"{m} imports {', '.join(f)}" for m, f in wrong.items()
    )


def test_the_checkout_has_no_symbolic_links() -> None:
    root = Path(__file__).resolve().parents[1]
    links = [
        str(p.relative_to(root))
        for top in ("vspan", "analysis", "collectors", "api", "tests")
        for p in (root / top).rglob("*")
        if p.is_symlink()
    ]
    assert links == []


def test_a_collector_loads_nothing_of_the_analyzer_side() -> None:
    # What `vspan collect` imports, directly or not, on a host that installed only
    # vspan[collector] (no pandas, pyarrow, DuckDB, FastAPI).
    code = """
import importlib, pkgutil, sys
import vspan.collectors as c
for m in pkgutil.walk_packages(c.__path__, "vspan.collectors."):
    if not m.name.startswith("vspan.collectors.simulator"):
        importlib.import_module(m.name)
import vspan.cli.collect
heavy = ("pandas", "pyarrow", "duckdb", "fastapi", "uvicorn", "vspan.analysis", "vspan.api")
print(sorted(k for k in heavy if k in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert done.stdout.strip() == "[]"
