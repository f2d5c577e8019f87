"""Compiled kernels: numba functions, compiled once per machine into a cache of vspan's own.

``@kernel`` is ``numba.njit(nogil=True)`` with numba's on-disk cache, placed by
``_Locator`` under ``cache_root() / DIGEST``:

* ``cache_root()`` is ``$VSPAN_KERNEL_CACHE``, else ``$NUMBA_CACHE_DIR/vspan``, else
  ``$XDG_CACHE_HOME/vspan/kernels`` (``~/.cache/vspan/kernels``), else a per-user
  temporary directory — the first that is writable. Nothing else of numba's changes: other
  code in the process keeps numba's defaults.
* ``DIGEST`` is a digest of every module of the package with kernels. numba checks a
  cached function against its own source file only, but a kernel has the kernels it calls
  from other modules compiled in; keyed by the digest, an edit of any of them (or an
  upgrade of vspan) starts a fresh cache.

The first run on a machine compiles (about half a minute for everything). ``warm(role,
workload)`` does it up front, with a line on stderr saying so, by running a workload that
calls every kernel of that role with the argument types vspan uses (``analysis.warmup``,
``collectors.warmup``), then leaves a marker (``warmed-<role>-<python>-<cpu>``) so that
later runs skip it; a run with the marker only loads what it calls from the cache. A call
with argument types the workload missed still works — numba compiles it then, once — and
the tests fail on it (``tests/vspan/test_kernels.py`` runs the workloads of the product and
checks that every kernel call was served from the cache).

vspan removes only what it made: when a new digest's directory is created, the
directories of other digests under the same root that hold vspan's marker file
(``VSPAN_KERNELS``, touched by every process that uses its directory) and were not used for
``KEEP_UNUSED_S`` (a week) are removed — an upgrade frees the old version's cache, while
two installs of different versions on one machine (two virtual environments) keep theirs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import numba
from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator

__all__ = [
    "DIGEST",
    "cache_dir",
    "cache_root",
    "kernel",
    "kernels",
    "literal_unroll",
    "source_digest",
    "warm",
    "warmed",
]

_F = TypeVar("_F", bound=Callable[..., Any])
log = logging.getLogger("vspan.kernels")
PACKAGE: Final = Path(__file__).resolve().parent
MARKER: Final = "VSPAN_KERNELS"
"""The file that says a directory under the cache root is one of vspan's digests."""
KEEP_UNUSED_S: Final = 7 * 86400.0
"""Another digest's cache is removed once unused this long (its marker's age)."""
literal_unroll: Final = numba.literal_unroll


def source_digest(package: Path = PACKAGE) -> str:
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


DIGEST: Final = source_digest()
"""The digest of this package's sources, at import."""


def _bases() -> list[Path]:
    """Where the cache root may be, in order (see the module docstring)."""
    out = [Path(env)] if (env := os.environ.get("VSPAN_KERNEL_CACHE")) else []
    if env := os.environ.get("NUMBA_CACHE_DIR"):
        out.append(Path(env) / "vspan")
    xdg = os.environ.get("XDG_CACHE_HOME")
    with contextlib.suppress(RuntimeError):  # no home directory
        out.append((Path(xdg) if xdg else Path.home() / ".cache") / "vspan" / "kernels")
    out.append(Path(tempfile.gettempdir()) / f"vspan-kernels-{os.getuid()}")
    return out


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


@functools.cache
def cache_dir() -> Path | None:
    """This digest's cache directory (made on first use, older digests' removed), or None
    when no place is writable. Found once per process."""
    for base in _bases():
        here = base / DIGEST
        fresh = not here.is_dir()
        if _writable(here):
            (here / MARKER).touch()
            if fresh:
                _remove_older(base, here)
            return here
    return None


def cache_root() -> Path | None:
    """The directory holding the digests' caches (None: no writable place)."""
    here = cache_dir()
    return None if here is None else here.parent


def _remove_older(base: Path, here: Path) -> None:
    now = time.time()
    for other in base.iterdir():
        marker = other / MARKER
        with contextlib.suppress(OSError):
            if other != here and marker.is_file() and now - marker.stat().st_mtime > KEEP_UNUSED_S:
                shutil.rmtree(other, ignore_errors=True)
                log.info("removed the kernel cache of another vspan, unused for a week: %s", other)


class _Locator(_CacheLocator):
    """numba's cache of one kernel: ``cache_dir() / <module>``, stamped with ``DIGEST``."""

    def __init__(self, py_func: Callable[..., Any], path: Path) -> None:
        self._lineno = py_func.__code__.co_firstlineno
        self._path = path

    def get_cache_path(self) -> str:
        return str(self._path)

    def get_source_stamp(self) -> str:
        return DIGEST

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func: Callable[..., Any], py_file: str) -> _Locator | None:
        here = cache_dir()
        if here is None:
            return None
        self = cls(py_func, here / py_func.__module__)
        try:
            cast(Any, self).ensure_cache_path()
        except OSError:
            return None
        return self


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_Locator]  # noqa: RUF012 - numba's class attribute


class _Cache(FunctionCache):
    _impl_class = _Impl


_KERNELS: list[Any] = []


def kernel(fn: _F) -> _F:
    """``numba.njit(nogil=True)``, cached in vspan's kernel cache; typed for mypy."""
    dispatcher = numba.njit(nogil=True)(fn)
    try:
        cast(Any, dispatcher)._cache = cast(Any, _Cache)(fn)
    except RuntimeError as exc:  # no writable place: compiled on every run
        log.warning("kernel %s is not cached: %s", fn.__qualname__, exc)
    _KERNELS.append(dispatcher)
    return cast(_F, dispatcher)


def kernels() -> list[Any]:
    """Every kernel's numba dispatcher (of the modules imported so far)."""
    return list(_KERNELS)


def _marker(role: str) -> Path | None:
    here = cache_dir()
    if here is None:
        return None
    import llvmlite.binding as llvm

    cpu = llvm.get_host_cpu_name()
    return here / f"warmed-{role}-{sys.implementation.cache_tag}-numba{numba.__version__}-{cpu}"


def warmed(role: str) -> bool:
    """Whether ``role``'s kernels are compiled in the cache for this interpreter and CPU."""
    marker = _marker(role)
    return marker is not None and marker.is_file()


def warm(
    role: str,
    workload: Callable[[], None],
    say: Callable[[str], None] | None = None,
    *,
    about: str = "about half a minute",
) -> float | None:
    """Compile ``role``'s kernels into the cache unless done before (``warmed``): run
    ``workload``, telling ``say`` (default: the log) before (how long it takes: ``about``)
    and after. Returns the seconds it took, or None when nothing was to do."""
    if warmed(role):
        return None
    tell = say or log.warning
    tell(f"compiling {role} kernels, first run only ({about}) ...")
    started = time.monotonic()
    workload()
    took = time.monotonic() - started
    marker = _marker(role)
    if marker is not None:
        marker.write_text(f"{took:.1f}\n")
    tell(f"{role} kernels compiled in {took:.0f} s (cached in {cache_dir()})")
    return took
