"""The ``vspan`` command: one subcommand per job (report, and the service commands as they land)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Final

from vspan import __version__
from vspan.errors import VspanError

__all__ = ["main"]


_OWN_MODULE: Final = {
    "report": "report",
    "demo": "demo",
    "collect": "collect",
    "analyze": "analyze",
    "predict": "predict",
    "kernels": "kernels",
}
"""Commands with a module of their own; the rest (flows, policy, ...) are ``query``'s."""


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` one of ``_OWN_MODULE`` only that command's (so that a
    run imports only what it needs: ``vspan report`` starts without the service modules)."""
    parser = argparse.ArgumentParser(
        prog="vspan",
        description="Traffic visibility and remote SPAN for virtualized datacenters.",
    )
    parser.add_argument("--version", action="version", version=f"vspan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [_OWN_MODULE[command]] if command in _OWN_MODULE else [*_OWN_MODULE.values()]
    for name in names:
        importlib.import_module(f"vspan.cli.{name}").add_parser(sub)
    if command not in _OWN_MODULE:
        from vspan.cli import query as cli_query

        cli_query.add_parsers(sub)
    return parser


ANALYZER_PACKAGES: Final = frozenset(
    {"pandas", "pyarrow", "dpkt", "pyshark", "fastapi", "uvicorn", "rich", "duckdb",
     "prometheus_client"}
)  # fmt: skip
"""What ``vspan[analyzer]`` adds to the base install (a collector's)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vspan`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ANALYZER_PACKAGES:
            raise
        what = f"vspan {argv[0]}" if argv else "vspan"
        print(
            f"{what}: needs the analyzer's packages ({exc.name} is not installed): "
            "pip install 'vspan[analyzer]'",
            file=sys.stderr,
        )
        return 2


def _main(argv: list[str]) -> int:
    parser = _build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
    except VspanError as exc:
        print(f"vspan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return status


_FAST_EXIT: Final = frozenset({"report"})
"""Batch commands that hold nothing needing a clean shutdown (files are closed, no service
threads, no database): the console script leaves them with ``os._exit`` once the output is
flushed, skipping interpreter teardown — freeing hundreds of MB of arrays took ~0.2 s."""


def entry() -> None:  # pragma: no cover - the console script; tests call main()
    """The ``vspan`` console script: ``main`` with the exit status."""
    argv = sys.argv[1:]
    status = main(argv)
    if argv and argv[0] in _FAST_EXIT:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(status)
    sys.exit(status)
