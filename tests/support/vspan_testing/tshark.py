"""Run tshark as an independent oracle: per-frame fields and conversation tables."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SHARED_PCAPS = Path(__file__).resolve().parents[4] / "shared" / "pcaps"
"""The real public captures beside the repository (``../shared/pcaps``)."""

needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None, reason="tshark is not installed (./run.sh test installs it)"
)


def shared_pcaps() -> list[Path]:
    """Every real capture of ``../shared/pcaps`` (empty when the folder is absent)."""
    return sorted(SHARED_PCAPS.glob("*.pcap")) if SHARED_PCAPS.is_dir() else []


def fields(
    path: Path,
    names: list[str],
    *,
    options: list[str] | None = None,
    display_filter: str | None = None,
) -> list[list[str]]:
    """One list of field values (``occurrence=f``: the first) per frame."""
    args = [
        "tshark",
        "-n",
        "-r",
        str(path),
        "-T",
        "fields",
        "-E",
        "separator=\t",
        "-E",
        "occurrence=f",
        *(options or []),
    ]
    if display_filter:
        args += ["-Y", display_filter]
    for name in names:
        args += ["-e", name]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout
    return [line.split("\t") for line in out.splitlines()]


_CONV = re.compile(
    r"^(?P<a>\S+)\s+<->\s+(?P<b>\S+)\s+(?P<fba>\d+)\s+(?P<bba>\d+)\s+(?P<uba>\S+)\s+"
    r"(?P<fab>\d+)\s+(?P<bab>\d+)\s+(?P<uab>\S+)\s+\d+\s+\d+\s+\S+"
)


def conversations(
    path: Path, kind: str, *, options: list[str] | None = None, display_filter: str | None = None
) -> dict[tuple[str, str], tuple[int, int | None, int, int | None]]:
    """``-z conv,KIND[,FILTER]``: {(A, B): (frames A→B, bytes A→B, frames B→A, bytes B→A)}
    over the frames ``display_filter`` selects (all without one).

    Bytes are None where tshark printed them in a unit other than bytes (rounded).
    """
    table = f"conv,{kind}" + (f",{display_filter}" if display_filter else "")
    args = ["tshark", "-n", "-q", "-r", str(path), *(options or []), "-z", table]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout
    convs: dict[tuple[str, str], tuple[int, int | None, int, int | None]] = {}
    for line in out.splitlines():
        m = _CONV.match(line)
        if not m:
            continue
        bab = int(m["bab"]) if m["uab"] == "bytes" else None
        bba = int(m["bba"]) if m["uba"] == "bytes" else None
        convs[(m["a"], m["b"])] = (int(m["fab"]), bab, int(m["fba"]), bba)
    return convs
