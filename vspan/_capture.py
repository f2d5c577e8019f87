"""Pieces shared by the capture-file readers and writers (private to vspan).

Layouts are ``(field, numpy type)`` tables in wire order; ``layout`` turns one into a
packed numpy dtype and ``struct_format`` into a ``struct`` format, so readers, writers and
numba kernels all take their offsets from the same table.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_CAPLEN",
    "MESSAGES",
    "REC_COLUMNS",
    "Fields",
    "Parsed",
    "Stop",
    "field_offsets",
    "grow",
    "kernel",
    "layout",
    "new_records",
    "struct_format",
    "u16",
    "u32",
    "wrap_i64",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Fields = tuple[tuple[str, str], ...]
_F = TypeVar("_F", bound=Callable[..., Any])

MAX_CAPLEN: Final = 262144
"""Captured lengths above ``max(snaplen, MAX_CAPLEN)`` mark a corrupt record (as libpcap)."""

_STRUCT_CODES: Final = {"u1": "B", "u2": "H", "u4": "I", "i4": "i", "u8": "Q", "i8": "q"}


def _source_digest(package: Path) -> str:
    """A digest of the package's modules with compiled code (those that use ``@kernel``,
    its subpackages included): what any kernel may have compiled in."""
    digest = hashlib.blake2b(digest_size=8)
    for root, dirs, files in os.walk(package, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(root, name)
            text = path.read_bytes()
            if b"@kernel" in text:
                digest.update(path.relative_to(package).as_posix().encode())
                digest.update(text)
    return digest.hexdigest()


def _cache_bases() -> list[Path]:
    """Where the kernel cache may live, in order: ``NUMBA_CACHE_DIR``, the user's cache
    directory (``XDG_CACHE_HOME`` or ``~/.cache``), a per-user temporary directory."""
    out = [Path(env)] if (env := os.environ.get("NUMBA_CACHE_DIR")) else []
    xdg = os.environ.get("XDG_CACHE_HOME")
    with contextlib.suppress(RuntimeError):  # no home directory
        out.append((Path(xdg) if xdg else Path.home() / ".cache") / "vspan" / "numba")
    out.append(Path(tempfile.gettempdir()) / f"vspan-numba-{os.getuid()}")
    return out


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _use_cache_dir() -> None:
    """Cache compiled kernels under a directory named after the package's source digest.

    numba checks a cached kernel against its own source file only, but a kernel has the
    functions it calls from other modules compiled in (the decoder's stages, the byte
    readers): after an edit of one of those alone, numba would run the old machine code.
    Keyed by the digest of all modules with kernels, an edit of any of them starts a fresh
    cache; the caches of other digests are removed. The first writable place of
    ``_cache_bases`` is used; with none, numba keeps its own default.
    """
    digest = _source_digest(Path(__file__).resolve().parent)
    for base in _cache_bases():
        here = base / digest
        if not _writable_dir(here):
            continue
        for other in base.glob("*"):
            if other != here and other.is_dir() and len(other.name) == len(here.name):
                shutil.rmtree(other, ignore_errors=True)
        cast(Any, numba.config).CACHE_DIR = str(here)
        return


_use_cache_dir()


def kernel(fn: _F) -> _F:
    """``numba.njit(cache=True, nogil=True)``, typed for mypy; cached per source digest."""
    return cast(_F, numba.njit(cache=True, nogil=True)(fn))


def layout(fields: Fields, order: str = "<") -> np.dtype[np.void]:
    """The packed numpy dtype of a ``(field, type)`` table in byte order ``order``."""
    return np.dtype([(name, order + code) for name, code in fields])


def struct_format(fields: Fields, order: str = "<") -> str:
    """The ``struct`` format of a ``(field, type)`` table in byte order ``order``."""
    return order + "".join(_STRUCT_CODES[code] for _, code in fields)


def field_offsets(fields: Fields) -> dict[str, int]:
    """Byte offset of each field of a ``(field, type)`` table."""
    found = layout(fields).fields
    assert found is not None
    return {name: int(spec[1]) for name, spec in found.items()}


def wrap_i64(value: int) -> int:
    """``value`` wrapped to a signed 64-bit integer (as numpy arrays wrap)."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


class Stop(IntEnum):
    """Why a walker returned; ``a``/``b`` in the messages are its two detail values."""

    END = 0
    SPECIAL = 1
    BAD_LENGTH = 2
    BAD_TRAILER = 3
    SHORT_BLOCK = 4
    UNKNOWN_IFACE = 5
    CAPLEN_BLOCK = 6
    CAPLEN_LIMIT = 7


MESSAGES: Final[dict[Stop, str]] = {
    Stop.BAD_LENGTH: "pcapng block length {a} is not a multiple of 4 of at least 12",
    Stop.BAD_TRAILER: "pcapng block trailing length {a} does not match its length {b}",
    Stop.SHORT_BLOCK: "pcapng block of type {b} is {a} bytes, shorter than its fields",
    Stop.UNKNOWN_IFACE: "packet for interface {a}, but the section describes {b} interfaces",
    Stop.CAPLEN_BLOCK: "captured length {a} does not fit in a block of {b} bytes",
    Stop.CAPLEN_LIMIT: "captured length {a} is over the limit {b} (max of snaplen, 262144)",
}

# Record columns the walkers fill, one int64 row per packet. TS_HI/TS_LO are the two
# timestamp words (pcap: seconds and fraction; pcapng: high and low 32 bits).
REC_DATA, REC_CAPLEN, REC_ORIGLEN, REC_TS_HI, REC_TS_LO, REC_IFACE, REC_KIND = range(7)
REC_COLUMNS: Final = 7


@kernel
def u32(buf: U8, p: int, big: bool) -> int:
    """The unsigned 32-bit integer at ``buf[p:p + 4]``."""
    b0, b1, b2, b3 = np.int64(buf[p]), np.int64(buf[p + 1]), np.int64(buf[p + 2]), buf[p + 3]
    if big:
        return int((b0 << 24) | (b1 << 16) | (b2 << 8) | np.int64(b3))
    return int(b0 | (b1 << 8) | (b2 << 16) | (np.int64(b3) << 24))


@kernel
def u16(buf: U8, p: int, big: bool) -> int:
    """The unsigned 16-bit integer at ``buf[p:p + 2]``."""
    if big:
        return int((np.int64(buf[p]) << 8) | np.int64(buf[p + 1]))
    return int(np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8))


@kernel
def new_records(nbytes: int) -> I64:
    """An initial record table for a walk over ``nbytes`` bytes (grown as needed)."""
    return np.empty((max(64, nbytes // 512), REC_COLUMNS), np.int64)


@kernel
def grow(rec: I64) -> I64:
    """``rec`` with twice the rows, the first ones copied."""
    bigger = np.empty((2 * rec.shape[0], REC_COLUMNS), np.int64)
    bigger[: rec.shape[0]] = rec
    return bigger


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a parser found in ``buf[start:end]``: packets, and where and why it stopped."""

    rec: I64
    """One row per packet, ``REC_*`` columns, ``REC_IFACE`` numbered across the file."""
    ts_ns: I64
    """Capture time of each packet, ns since the epoch."""
    linktype: npt.NDArray[np.uint16]
    """Link type of each packet."""
    stop: int
    """First byte not consumed (the start of an incomplete or corrupt record)."""
    need: int
    """Bytes needed from ``stop`` to go on (0 when stopped by an error)."""
    error: str | None
    """Why the record at ``stop`` is corrupt, or None."""
