"""The compiled-kernel cache is keyed by all modules with kernels, not one file per kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba

from vspan import _capture

KERNEL = "@kernel\ndef f(): pass\n"


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_an_edit_in_any_module_changes_the_digest(tmp_path: Path) -> None:
    pkg = tree(tmp_path / "pkg", {"a.py": KERNEL + "x = 1\n", "sub/b.py": KERNEL + "y = 2\n"})
    before = _capture._source_digest(pkg)
    assert _capture._source_digest(pkg) == before  # deterministic
    (pkg / "sub" / "b.py").write_text(KERNEL + "y = 3\n")  # a module the kernel calls into
    assert _capture._source_digest(pkg) != before


def test_modules_without_kernels_do_not_change_the_digest(tmp_path: Path) -> None:
    pkg = tree(tmp_path / "pkg", {"a.py": KERNEL + "x = 1\n", "api.py": "y = 2\n"})
    before = _capture._source_digest(pkg)
    (pkg / "api.py").write_text("y = 3\n")
    assert _capture._source_digest(pkg) == before


def test_bytecode_and_cache_files_do_not_change_the_digest(tmp_path: Path) -> None:
    pkg = tree(tmp_path / "pkg", {"a.py": KERNEL + "x = 1\n"})
    before = _capture._source_digest(pkg)
    tree(pkg, {"__pycache__/a.cpython-311.pyc": "junk", "__pycache__/a.f-1.py311.nbi": "junk"})
    tree(pkg, {"notes.txt": "not source"})
    assert _capture._source_digest(pkg) == before


def test_kernels_are_cached_under_this_checkouts_digest() -> None:
    here = Path(_capture.__file__).resolve().parent
    assert Path(numba.config.CACHE_DIR).name == _capture._source_digest(here)


def test_an_unusable_cache_place_falls_back_to_the_next(tmp_path: Path) -> None:
    # A path under a regular file cannot be created, even by root.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(blocked / "numba"),
        "XDG_CACHE_HOME": str(blocked / "xdg"),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    (tmp_path / "tmp").mkdir()
    code = "import numba, vspan._capture as c; c.new_records(0); print(numba.config.CACHE_DIR)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    used = Path(out.stdout.strip())
    assert used.parent == tmp_path / "tmp" / f"vspan-numba-{os.getuid()}"
    assert any(used.rglob("*.nbi"))  # the kernel was cached there
