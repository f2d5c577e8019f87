"""Compiled kernels: the cache keyed by all modules with kernels, the ahead-of-time module
(its entries chosen by argument types exactly as numba types them, its results equal to
numba's), and the switch to numba for a call it has no entry for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
import pytest

from vspan import _kernels, aot

KERNEL = "@kernel\ndef f(): pass\n"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "pcaps"


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_an_edit_in_any_module_changes_the_digest(tmp_path: Path) -> None:
    pkg = tree(tmp_path / "pkg", {"a.py": KERNEL + "x = 1\n", "sub/b.py": KERNEL + "y = 2\n"})
    before = _kernels.source_digest(pkg)
    assert _kernels.source_digest(pkg) == before  # deterministic
    (pkg / "sub" / "b.py").write_text(KERNEL + "y = 3\n")  # a module the kernel calls into
    assert _kernels.source_digest(pkg) != before


def test_modules_without_kernels_do_not_change_the_digest(tmp_path: Path) -> None:
    pkg = tree(tmp_path / "pkg", {"a.py": KERNEL + "x = 1\n", "api.py": "y = 2\n"})
    before = _kernels.source_digest(pkg)
    (pkg / "api.py").write_text("y = 3\n")
    assert _kernels.source_digest(pkg) == before


def test_bytecode_and_cache_files_do_not_change_the_digest(tmp_path: Path) -> None:
    pkg = tree(tmp_path / "pkg", {"a.py": KERNEL + "x = 1\n"})
    before = _kernels.source_digest(pkg)
    tree(pkg, {"__pycache__/a.cpython-311.pyc": "junk", "__pycache__/a.f-1.py311.nbi": "junk"})
    tree(pkg, {"notes.txt": "not source"})
    assert _kernels.source_digest(pkg) == before


def test_numba_caches_kernels_under_this_checkouts_digest() -> None:
    code = "import numba, vspan._capture as c; c.new_records(0); print(numba.config.CACHE_DIR)"
    used = Path(python(code, VSPAN_KERNELS="jit").strip())
    assert used.name == _kernels.source_digest()


def test_an_unusable_cache_place_falls_back_to_the_next(tmp_path: Path) -> None:
    # A path under a regular file cannot be created, even by root.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    (tmp_path / "tmp").mkdir()
    code = "import numba, vspan._capture as c; c.new_records(0); print(numba.config.CACHE_DIR)"
    out = python(
        code,
        VSPAN_KERNELS="jit",
        NUMBA_CACHE_DIR=str(blocked / "numba"),
        XDG_CACHE_HOME=str(blocked / "xdg"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    used = Path(out.strip())
    assert used.parent == tmp_path / "tmp" / f"vspan-numba-{os.getuid()}"
    assert any(used.rglob("*.nbi"))  # the kernel was cached there


class Color(IntEnum):
    RED = 1


class Pair(NamedTuple):
    a: Any
    b: Any


def _values() -> list[Any]:
    base = np.arange(24, dtype=np.int64)
    readonly = np.zeros(4, np.uint8)
    readonly.flags.writeable = False
    unaligned = np.frombuffer(bytearray(33), np.uint8)[1:].view(np.int64)
    return [
        True, np.bool_(False), 7, -(1 << 63), 1 << 63, 2.5, np.float32(1.5), np.int32(3),
        np.uint64(9), np.int64(-1), Color.RED,
        base, base[::2], base.reshape(4, 6), base.reshape(4, 6).T, base.reshape(4, 6)[:, 1:],
        np.zeros((0, 7), np.int64), np.zeros(1, np.uint16), readonly, unaligned,
        np.zeros(3, np.float64), np.zeros(2, np.bool_),
        (1, base), (base, base), Pair(base, readonly), (), ((1, 2.0), Pair(True, 3)),
    ]  # fmt: skip


@pytest.mark.parametrize("value", _values(), ids=lambda v: type(v).__name__)
def test_the_runtime_key_is_the_key_of_numbas_type(value: Any) -> None:
    assert _kernels.arg_key(value) == aot.type_key(numba.typeof(value))


def test_values_numba_cannot_take_have_no_key() -> None:
    for value in ("text", None, [1, 2], {"a": 1}, object()):
        with pytest.raises(TypeError):
            _kernels.arg_key(value)


def test_different_types_give_different_keys() -> None:
    keys = [_kernels.arg_key(v) for v in _values()]
    types = [numba.typeof(v) for v in _values()]
    for i, ti in enumerate(types):
        for j, tj in enumerate(types):
            assert (keys[i] == keys[j]) == (ti == tj), (_values()[i], _values()[j])


REPORT = """
import json, sys
from vspan import _kernels
from vspan.analysis.report import analyze_captures
from vspan.analysis.engine import Engine, warm_batch
from vspan.analysis.textrows import text_blocks
from vspan.synth import generate_small
report = analyze_captures(sys.argv[1:], chunk_bytes=1 << 14)
engine = Engine()
engine.process(generate_small(3).frames)
engine.flush()
flows = engine.drain()
text = {f: b"".join(text_blocks(report.records, f)).decode() for f in ("json", "csv")}
print(json.dumps({
    "mode": _kernels.kernel_mode(),
    "numba": "numba" in sys.modules,
    "flows": report.flows.to_json(orient="records"),
    "summary": report.summary.to_json(orient="records"),
    "json": text["json"],
    "csv": text["csv"],
    "engine": flows.sort_values(list(flows.columns)).to_json(orient="records"),
}))
"""


@pytest.fixture(scope="module")
def built() -> Path:
    """The AOT module for these sources (built here unless ``./run.sh`` built it)."""
    return aot.build(quiet=True)


def _captures(tmp_path: Path) -> list[str]:
    from vspan.synth import generate_small, write_capture

    write_capture(generate_small(1), tmp_path / "a.pcap", "pcap")
    write_capture(generate_small(2), tmp_path / "b.pcapng")
    return [str(tmp_path / "a.pcap"), str(tmp_path / "b.pcapng"), *map(str, SHARED.glob("*.pcap"))]


def test_compiled_entries_serve_report_and_engine_without_numba(
    built: Path, tmp_path: Path
) -> None:
    files = _captures(tmp_path)
    ahead = json.loads(python(REPORT.replace("sys.argv[1:]", repr(files))))
    jit = json.loads(python(REPORT.replace("sys.argv[1:]", repr(files)), VSPAN_KERNELS="jit"))
    assert (ahead["mode"], ahead["numba"]) == ("aot", False)
    assert (jit["mode"], jit["numba"]) == ("jit", True)
    for part in ("flows", "summary", "engine", "json", "csv"):
        assert ahead[part] == jit[part]
    assert len(json.loads(ahead["flows"])) > 100


def test_a_call_without_an_entry_switches_to_numba_and_stays_right(built: Path) -> None:
    code = """
import numpy as np, sys
from vspan import _capture, _kernels
from vspan.analysis.decode import decode_batch
from vspan.analysis.engine import warm_batch
before = (_kernels.kernel_mode(), "numba" in sys.modules)
# int32 rows: no entry was built for them
grown = _capture.grow(np.ascontiguousarray(np.zeros((3, _capture.REC_COLUMNS), np.int32)))
after = (_kernels.kernel_mode(), "numba" in sys.modules)
dec = decode_batch(warm_batch())  # the decoder compiles with the swapped-in stages
print(before, after, grown.shape, int(dec.src_port[0]), int(dec.dst_port[0]))
"""
    out = python(code).split()
    assert out[:4] == ["('aot',", "False)", "('jit',", "True)"]
    assert out[4:6] == ["(6,", "7)"]
    from vspan.analysis.decode import decode_batch
    from vspan.analysis.engine import warm_batch

    dec = decode_batch(warm_batch())
    assert out[6:] == [str(int(dec.src_port[0])), str(int(dec.dst_port[0]))]


def test_a_module_built_for_another_interpreter_is_not_loaded(built: Path, tmp_path: Path) -> None:
    digest = _kernels.source_digest()
    assert built == _kernels.aot_dir(built.parent)
    assert sys.implementation.cache_tag in built.name
    assert f"numpy{np.__version__.split('.')[0]}" in built.name
    mode = "from vspan import _kernels; print(_kernels.kernel_mode())"
    other = tmp_path / digest / "aot-cpython-399-numpy9"  # what another Python built
    shutil.copytree(built, other)
    assert python(mode, NUMBA_CACHE_DIR=str(tmp_path)).strip() == "jit"
    other.rename(tmp_path / digest / built.name)  # the same files, for this Python
    assert python(mode, NUMBA_CACHE_DIR=str(tmp_path)).strip() == "aot"


def test_the_collectors_ring_walk_has_compiled_entries(built: Path) -> None:
    # Regression: the build imported the module as ``collectors._tpacket``, a name that
    # only exists in a checkout's root, so its entries were keyed under a name the
    # installed package never uses and the first ring switched the collector to numba.
    code = """
import sys
from vspan import _kernels
from vspan.collectors import _tpacket
_tpacket._compile_kernels()
print(_kernels.kernel_mode(), "numba" in sys.modules)
"""
    assert python(code).split() == ["aot", "False"]
