"""The wheel holds every module once, the dashboard's files, the example and py.typed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_NOT_SOURCES = (
    ".git",
    ".venv",
    "build",
    "*.egg-info",
    "__pycache__",
    "out",
    ".*_cache",
    ".hypothesis",
)


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    # A clean copy of the checkout (setuptools would reuse a stale build/ directory), built
    # with the environment's own setuptools, no download: what `pip install .` builds.
    src = out / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("vspan-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _sources(top: str) -> list[Path]:
    """The ``.py`` files under ``REPO/top``, not through symlinked directories."""
    out = []
    for path in (REPO / top).rglob("*.py"):
        parents = path.relative_to(REPO / top).parents
        if "__pycache__" in path.parts or any((REPO / top / d).is_symlink() for d in parents):
            continue
        out.append(path)
    return out


def test_every_source_module_is_in_the_wheel_once(wheel_names: list[str]) -> None:
    # vspan/analysis, vspan/collectors and vspan/api are symlinks in the checkout (for
    # mypy); the wheel holds those directories' modules once, under vspan/.
    expected = {f"vspan/{p.relative_to(REPO / 'vspan').as_posix()}" for p in _sources("vspan")}
    for top in ("analysis", "collectors", "api"):
        expected |= {f"vspan/{p.relative_to(REPO).as_posix()}" for p in _sources(top)}
    modules = [n for n in wheel_names if n.endswith(".py")]
    assert len(modules) == len(set(modules))
    assert set(modules) == expected


def test_package_data_is_in_the_wheel(wheel_names: list[str]) -> None:
    static = {p.name for p in (REPO / "api" / "static").iterdir()}
    assert static <= {n.removeprefix("vspan/api/static/") for n in wheel_names}
    assert "vspan/examples/profiles.yaml" in wheel_names
    assert "vspan/py.typed" in wheel_names


def test_the_license_is_in_the_wheel_and_matches_the_metadata(wheel_names: list[str]) -> None:
    licenses = [n for n in wheel_names if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(licenses) == 1
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
