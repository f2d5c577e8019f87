"""Compiled kernels: numba's cache in a place of vspan's own keyed by all modules with
kernels, nothing else touched; the first run compiles and says so, the next ones do not;
and the workloads the warm-up runs cover every kernel call of the product (a call it
misses would compile silently on a user's first run)."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vspan import kernels as _kernels
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.netlab import vspan_command

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


def _cached_modules(root: Path) -> set[str]:
    """Modules with a kernel cached under ``root`` (index files of numba's cache)."""
    return {p.parent.name for p in root.glob(f"{_kernels.DIGEST}/*/*.nbi")}


def test_kernels_are_cached_under_the_digest_in_vspans_own_place(tmp_path: Path) -> None:
    root = tmp_path / "kernels"
    code = "import vspan.pcap._layout as c; c.new_records(0); print('ok')"
    python(code, VSPAN_KERNEL_CACHE=str(root))
    assert "vspan.pcap._layout" in _cached_modules(root)
    assert (root / _kernels.DIGEST / _kernels.MARKER).is_file()


def test_numbas_own_settings_and_other_code_are_left_alone(tmp_path: Path) -> None:
    # Regression: the kernel loader set numba.config.CACHE_DIR for the whole process, and
    # deleted every 16-character directory under NUMBA_CACHE_DIR.
    numba_dir = tmp_path / "numba"
    foreign = numba_dir / "0123456789abcdef"  # someone else's, named like a digest
    foreign.mkdir(parents=True)
    code = """
import numba
before = numba.config.CACHE_DIR
import vspan.pcap._layout as c
c.new_records(0)
print(before == numba.config.CACHE_DIR)
"""
    assert python(code, NUMBA_CACHE_DIR=str(numba_dir)).strip() == "True"
    assert foreign.is_dir()
    assert "vspan.pcap._layout" in _cached_modules(numba_dir / "vspan")  # under NUMBA_CACHE_DIR


def test_only_caches_vspan_made_and_nobody_used_for_a_week_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "kernels"
    unused, recent, unmarked = (root / d for d in ("fedcba9876543210", "0011223344556677",
                                                   "0123456789abcdef"))  # fmt: skip
    for d in (unused, recent, unmarked):
        d.mkdir(parents=True)
    for d in (unused, recent):
        (d / _kernels.MARKER).touch()
    week_ago = time.time() - _kernels.KEEP_UNUSED_S - 60
    os.utime(unused / _kernels.MARKER, (week_ago, week_ago))
    python("import vspan.pcap._layout as c; c.new_records(0)", VSPAN_KERNEL_CACHE=str(root))
    assert not unused.exists()
    assert recent.is_dir()  # another install's, in use: kept
    assert unmarked.is_dir()  # not vspan's: kept
    assert (root / _kernels.DIGEST).is_dir()


def test_an_unusable_cache_place_falls_back_to_the_next(tmp_path: Path) -> None:
    # A path under a regular file cannot be created, even by root.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    (tmp_path / "tmp").mkdir()
    code = (
        "import vspan.kernels as k, vspan.pcap._layout as c; c.new_records(0); print(k.cache_dir())"
    )
    out = python(
        code,
        VSPAN_KERNEL_CACHE=str(blocked / "vspan"),
        NUMBA_CACHE_DIR=str(blocked / "numba"),
        XDG_CACHE_HOME=str(blocked / "xdg"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    root = tmp_path / "tmp" / f"vspan-kernels-{os.getuid()}"
    assert Path(out.strip()) == root / _kernels.DIGEST
    assert "vspan.pcap._layout" in _cached_modules(root)


# --- a machine's first run, as a user meets it ------------------------------------------

PRODUCT = r"""
import json, socket, sys, time
from pathlib import Path
from vspan import kernels as _kernels
from vspan.analysis.service.config import AnalyzerConfig
from vspan.analysis.service.analyzer import Analyzer
from vspan.cli import main
from vspan.synth import generate_small, write_capture, write_inventory_yaml

tmp = Path(sys.argv[1])
files = sys.argv[2:]
capture = generate_small(5)
write_capture(capture, tmp / "dc.pcapng")
write_inventory_yaml(capture, tmp / "dc.yaml")
analyzer = Analyzer(AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp / "data")))
analyzer.start()
port = analyzer.addresses()["udp"][1]
collect = ["collect", "--replay", str(tmp / "dc.pcapng"), "--max-speed",
           "--inventory", str(tmp / "dc.yaml"), "--host", capture.hosts[0].name,
           "--analyzer", f"127.0.0.1:{port}", "--stats-interval", "60"]
codes = {"collect": main(collect)}
deadline = time.monotonic() + 60
while analyzer.engine.frames == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
frames = analyzer.engine.frames
analyzer.stop()
for fmt in ("table", "json", "csv"):
    codes[f"report {fmt}"] = main(["report", *files, "--format", fmt, "-o", str(tmp / f"r.{fmt}")])
codes["report by vm"] = main(["report", str(tmp / "dc.pcapng"), "--inventory", str(tmp / "dc.yaml"),
                             "--by", "vm", "-o", str(tmp / "vm.txt")])
codes["export"] = main(["export", "--data-dir", str(tmp / "data"), "-o", str(tmp / "x.pcapng")])
misses = {
    f"{d.py_func.__module__}.{d.py_func.__qualname__}": [str(s) for s in d.stats.cache_misses]
    for d in _kernels.kernels() if d.stats.cache_misses
}
print(json.dumps({"codes": codes, "frames": frames, "misses": misses}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(api: str) -> dict[str, Any]:
    with urllib.request.urlopen(api + "/healthz", timeout=10) as response:
        out: dict[str, Any] = json.loads(response.read())
        return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A machine's first run, in a fresh kernel cache: ``vspan analyze`` (compiles the
    analyzer's kernels in the background), then a second ``vspan analyze``, then the
    product's workloads in one process."""
    tmp = tmp_path_factory.mktemp("first-run")
    env = {**os.environ, "VSPAN_KERNEL_CACHE": str(tmp / "kernels")}
    spawn = functools.partial(subprocess.Popen, env=env)
    seen: dict[str, Any] = {}
    for run in ("cold", "warm"):
        args = ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", f"127.0.0.1:{_free_port()}",
                "--data-dir", str(tmp / f"data-{run}")]  # fmt: skip
        proc = AnalyzerProcess(args, stderr_path=tmp / f"{run}.log", spawn=spawn)
        proc.wait_started(timeout=120)
        seen[f"{run} health"] = _health(proc.api)
        deadline = time.monotonic() + 300
        while not _health(proc.api)["ready"]:
            assert time.monotonic() < deadline, proc.stderr()
            time.sleep(0.2)
        proc.stop()
        seen[f"{run} log"] = proc.stderr()
    from vspan.synth import generate_small, write_capture, write_inventory_yaml

    replayed = generate_small(7)
    write_capture(replayed, tmp / "replay.pcap", "pcap")
    write_inventory_yaml(replayed, tmp / "replay.yaml")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # bound, never read
        sink.bind(("127.0.0.1", 0))
        collect = subprocess.run(
            [*vspan_command(), "collect", "--replay", str(tmp / "replay.pcap"), "--max-speed",
             "--inventory", str(tmp / "replay.yaml"), "--host", replayed.hosts[1].name,
             "--analyzer", f"127.0.0.1:{sink.getsockname()[1]}", "--stats-interval", "60"],
            env=env, capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
    assert collect.returncode == 0, collect.stderr
    seen["collect log"] = collect.stderr
    files = [str(p) for p in sorted(SHARED.glob("*.pcap")) + sorted(SHARED.glob("tunnels/*.pcap"))]
    work = tmp / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", PRODUCT, str(work), *files],
        env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    seen["product"] = json.loads(done.stdout.strip().splitlines()[-1])
    seen["product log"] = done.stderr
    seen["cli"] = subprocess.run(
        [*vspan_command(), "kernels"], env=env, capture_output=True, text=True, check=False
    )
    return seen


def test_the_first_analyzer_answers_health_while_its_kernels_compile(
    first_run: dict[str, Any],
) -> None:
    # /healthz answered before the kernels were compiled (about half a minute): the HTTP
    # server does not wait for them; the log says what is happening, once.
    assert first_run["cold health"] == {"status": "ok", "ready": False}
    assert first_run["cold log"].count("compiling analyzer kernels, first run only") == 1
    assert "analyzer kernels compiled in" in first_run["cold log"]
    assert "compiling" not in first_run["warm log"]


def test_the_warm_up_covers_every_kernel_call_of_the_product(first_run: dict[str, Any]) -> None:
    # After the first runs of `vspan analyze` and `vspan collect` (each compiled its role's
    # kernels, and said so), collecting, analyzing live, reporting over every shared capture
    # and exporting compile nothing: every call found its kernel in the cache.
    product = first_run["product"]
    assert set(product["codes"].values()) <= {0, 1}, product["codes"]
    assert product["frames"] > 0
    assert product["misses"] == {}, json.dumps(product["misses"], indent=1)
    assert first_run["collect log"].count("compiling collector kernels, first run only") == 1
    assert "compiling" not in first_run["product log"]


def test_vspan_kernels_says_where_and_what_is_compiled(first_run: dict[str, Any]) -> None:
    cli = first_run["cli"]
    assert cli.returncode == 0, cli.stderr
    lines = dict(line.split(None, 1) for line in cli.stdout.splitlines())
    assert lines["digest"] == _kernels.DIGEST
    assert lines["analyzer"] == "compiled"
    assert lines["collector"] == "compiled"
    assert lines["cache"].endswith(_kernels.DIGEST)
