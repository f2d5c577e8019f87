"""Compiled kernels: numba functions, run ahead-of-time compiled when they can be.

``@kernel`` marks a function written in numba's subset of Python. There are two ways to run
one, chosen when this module is imported:

* **AOT.** ``python -m vspan.aot`` (``./run.sh`` runs it) compiles every kernel, for each
  argument types a workload calls it with, into one extension module in the kernel cache
  (``aot_dir``: ``<cache>/<digest>/aot-<python>-numpy<major>``). When that module exists
  for the current source digest and interpreter, a kernel is a ``Kernel`` that calls its
  compiled entry for the types of its arguments, and
  numba is not imported at all: a process starts about 0.25 s sooner (numba's import and its
  first-dispatch set-up), which is most of ``vspan report``'s start-up.
* **JIT.** Otherwise (no module for this digest, ``VSPAN_KERNELS=jit``, or a call with
  argument types the module has no entry for), numba compiles each kernel on its first call
  and caches the machine code on disk. A call that finds no entry switches the whole process
  to JIT (``_switch_to_jit``) and is then served by numba: never a wrong or failed call.

Both are keyed by ``source_digest``: numba checks a cached kernel against its own source
file only, but a kernel has the functions it calls from other modules compiled in (the
decoder's stages, the byte readers); after an edit of one of those alone numba would run the
old machine code. Keyed by the digest of all modules with kernels, an edit of any of them
starts a fresh cache (and the caches of other digests are removed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterable
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import numpy as np

__all__ = [
    "AOT_MODULE",
    "CACHE",
    "DIGEST",
    "Kernel",
    "aot_dir",
    "aot_files",
    "arg_key",
    "kernel",
    "kernel_mode",
    "literal_unroll",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_log = logging.getLogger(__name__)
PACKAGE: Final = Path(__file__).resolve().parent
AOT_MODULE: Final = "vspan_kernels"
"""Name of the extension module ``vspan.aot`` builds (``<AOT_MODULE>.json``: its entries)."""
MODE_ENV: Final = "VSPAN_KERNELS"
"""``jit``: never load the AOT module (``vspan.aot`` builds with it)."""


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


def cache_dir(digest: str) -> Path | None:
    """The cache of this digest in the first writable place of ``_cache_bases`` (the caches
    of other digests there are removed), or None when no place is writable."""
    for base in _cache_bases():
        here = base / digest
        if not _writable_dir(here):
            continue
        for other in base.glob("*"):
            if other != here and other.is_dir() and len(other.name) == len(here.name):
                shutil.rmtree(other, ignore_errors=True)
        return here
    return None


def arg_key(value: object) -> Hashable:
    """What numba types ``value`` as, as plain data (``vspan.aot`` derives the same key from
    numba's type); raises TypeError for a value no entry is built for."""
    if isinstance(value, np.ndarray):
        flags = value.flags
        layout = "C" if flags.c_contiguous else "F" if flags.f_contiguous else "A"
        return (value.dtype.str, value.ndim, layout, flags.writeable)  # numba: always aligned
    kind = type(value)
    if kind is bool:
        return "bool"
    if kind is int:
        return "int64" if -(1 << 63) <= cast(int, value) < 1 << 63 else "uint64"
    if kind is float:
        return "float64"
    if isinstance(value, np.number | np.bool_):
        return value.dtype.name
    if isinstance(value, IntEnum):
        return ("enum", kind.__qualname__)
    if isinstance(value, tuple):
        name = "tuple" if kind is tuple else kind.__qualname__
        return (name, *(arg_key(v) for v in value))
    raise TypeError(f"no compiled entry takes a {kind.__qualname__}")


def _keys_from_json(value: Any) -> Hashable:
    return tuple(_keys_from_json(v) for v in value) if isinstance(value, list) else value


class Kernel:
    """A kernel in AOT mode: calls the compiled entry for its arguments' types, or numba."""

    def __init__(self, fn: Callable[..., Any], entries: dict[Hashable, Callable[..., Any]]):
        self.py_func = fn
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        self._entries = entries
        self.dispatcher: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.dispatcher is None:
            try:
                entry = self._entries[arg_key(args)]
            except (KeyError, TypeError):
                _log.info("no compiled entry of %s for %r: numba takes over", self.__name__, args)
                _switch_to_jit()
            else:
                return entry(*args)
        assert self.dispatcher is not None
        return self.dispatcher(*args)


def aot_dir(cache: Path) -> Path:
    """Where the AOT module of a digest's ``cache`` is for this interpreter: an extension
    module is built for one Python ABI and one numpy C API (major version)."""
    numpy_major = np.__version__.split(".", 1)[0]
    return cache / f"aot-{sys.implementation.cache_tag}-numpy{numpy_major}"


def aot_files(cache: Path) -> tuple[Path, Path] | None:
    """The AOT module and its manifest in a digest's ``cache``, for this interpreter; None
    unless both are there."""
    here = aot_dir(cache)
    built = sorted(here.glob(f"{AOT_MODULE}.*.so"))
    manifest = here / f"{AOT_MODULE}.json"
    return (built[0], manifest) if built and manifest.is_file() else None


def _load_aot(cache: Path | None) -> dict[str, dict[Hashable, Callable[..., Any]]] | None:
    """The entries of the AOT module in a digest's ``cache``, by kernel; None if there is
    none (or it cannot be loaded: a partial build)."""
    if os.environ.get(MODE_ENV) == "jit" or cache is None or (files := aot_files(cache)) is None:
        return None
    built, manifest = files
    try:
        spec = importlib.util.spec_from_file_location(AOT_MODULE, built)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        entries: dict[str, dict[Hashable, Callable[..., Any]]] = {}
        for row in json.loads(manifest.read_text()):
            by_key = entries.setdefault(row["kernel"], {})
            by_key[_keys_from_json(row["key"])] = getattr(module, row["export"])
    except (ImportError, OSError, ValueError, KeyError, AttributeError, AssertionError):
        return None
    return entries


def _identity(container: Any) -> Any:
    return container


DIGEST: Final = source_digest()
"""The digest of this package's sources, at import."""
CACHE: Final = cache_dir(DIGEST)
"""The kernel cache of ``DIGEST`` (None when no place is writable)."""


class _State:
    aot = _load_aot(CACHE)
    """The entries while in AOT mode, else None."""


_REGISTRY: list[Kernel] = []
_SWITCH = threading.Lock()
literal_unroll: Callable[[Any], Any] = _identity
"""numba's ``literal_unroll`` (in AOT mode a stand-in until a switch to JIT)."""


def _numba() -> Any:
    """numba, imported, with its cache under this digest's directory."""
    import numba

    if CACHE is not None:
        cast(Any, numba.config).CACHE_DIR = str(CACHE)
    return numba


_JITTED: list[tuple[str, Any]] = []


def _jit(fn: Callable[..., Any]) -> Any:
    dispatcher = _numba().njit(cache=True, nogil=True)(fn)
    _JITTED.append((f"{fn.__module__}:{fn.__qualname__}", dispatcher))
    return dispatcher


def jitted() -> list[tuple[str, Any]]:
    """(kernel name, numba dispatcher) of every kernel numba runs (for ``vspan.aot``)."""
    return list(_JITTED)


def _switch_to_jit() -> None:
    """Give every kernel a numba dispatcher, and put the dispatchers where numba looks for
    the functions a kernel calls: the globals of vspan's modules."""
    with _SWITCH:
        if _State.aot is None:
            return
        numba = _numba()
        swaps: dict[int, Any] = {id(_identity): numba.literal_unroll}
        for k in _REGISTRY:
            k.dispatcher = _jit(k.py_func)
            swaps[id(k)] = k.dispatcher
        # ``literal_unroll`` too, in the modules that took it from here (and here).
        _swap_globals(
            swaps, (m for n, m in list(sys.modules.items()) if n.split(".")[0] == "vspan")
        )
        _State.aot = None


def _swap_globals(swaps: dict[int, Any], modules: Iterable[Any]) -> None:
    for module in modules:
        names = vars(module)
        for name, value in list(names.items()):
            if id(value) in swaps:
                names[name] = swaps[id(value)]


if _State.aot is None:
    literal_unroll = _numba().literal_unroll


def kernel(fn: _F) -> _F:
    """``numba.njit(cache=True, nogil=True)``, typed for mypy; in AOT mode a ``Kernel``."""
    with _SWITCH:
        if _State.aot is not None:
            k = Kernel(fn, _State.aot.get(f"{fn.__module__}:{fn.__qualname__}", {}))
            _REGISTRY.append(k)
            return cast(_F, k)
    return cast(_F, _jit(fn))


def kernel_mode() -> str:
    """``aot`` while compiled entries serve the kernels, else ``jit``."""
    return "jit" if _State.aot is None else "aot"
