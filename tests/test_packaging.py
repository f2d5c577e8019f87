"""The wheel holds every module once, the dashboard's files, the example and py.typed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vspan.synth import generate_small, write_capture, write_inventory_yaml
from vspan.wire.tunnel import decode_message

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
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A clean copy of the checkout (setuptools would reuse a stale build/ directory), built
    # with the environment's own setuptools, no download: what `pip install .` builds.
    src = out / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("vspan-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_names(wheel_path: Path) -> list[str]:
    with zipfile.ZipFile(wheel_path) as zf:
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


@pytest.mark.slow
def test_a_collector_install_collects_and_asks_for_the_analyzer_extra(
    wheel_path: Path, tmp_path: Path
) -> None:
    # `pip install vspan[collector]` on a hypervisor: no pandas, DuckDB or FastAPI; `vspan
    # collect` works (here: replaying a capture), `vspan report` names the extra it needs.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"{wheel_path}[collector]"], check=True, capture_output=True)
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        check=True, capture_output=True, text=True,
    ).stdout.lower()  # fmt: skip
    for heavy in ("pandas", "pyarrow", "duckdb", "fastapi", "uvicorn"):
        assert f"\n{heavy}==" not in f"\n{listed}", heavy
    capture = generate_small(3)
    pcap, inventory = tmp_path / "h.pcap", tmp_path / "inventory.yaml"
    write_capture(capture, pcap, "pcap")
    write_inventory_yaml(capture, inventory)
    vspan = str(venv / "bin" / "vspan")
    env = {**os.environ, "VSPAN_KERNEL_CACHE": str(tmp_path / "kernels")}
    report = subprocess.run([vspan, "report", str(pcap)], capture_output=True, text=True,
                            env=env, check=False)  # fmt: skip
    assert report.returncode == 2
    assert "pip install 'vspan[analyzer]'" in report.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(30)
        collect = subprocess.Popen(
            [vspan, "collect", "--replay", str(pcap), "--max-speed", "--inventory",
             str(inventory), "--host", capture.hosts[0].name,
             "--analyzer", f"127.0.0.1:{sink.getsockname()[1]}"],
            stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        datagram = sink.recv(65536)
        _, err = collect.communicate(timeout=120)
    assert collect.returncode == 0, err
    message = decode_message(datagram)  # a valid tunnel message with frames
    assert message.count > 0
