"""``vspan kernels``: where vspan's compiled kernels are cached, and compiling them up front.

vspan's hot loops are numba kernels compiled once per machine (``vspan.kernels``). Every
command that needs them compiles what is missing on its first run and says so on stderr;
``vspan kernels --compile`` does it ahead (in an image build, a provisioning step).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run"]

_ROLES = ("analyzer", "collector")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "kernels",
        help="show or fill the compiled-kernel cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the kernels now if they are not cached (about half a minute per role)",
    )
    p.add_argument(
        "--role",
        choices=(*_ROLES, "all"),
        default="all",
        help="which kernels: the analyzer's (and vspan report's), the collector's, or all "
        "(default: all)",
    )
    p.set_defaults(run=run)


def say(text: str) -> None:
    """A progress line on stderr, as every command prints it."""
    print(f"vspan: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Print the cache's place and state (after compiling, with ``--compile``); 0, or 1 when
    no writable place exists for the cache."""
    from vspan import kernels as _kernels
    from vspan.analysis import warmup as analyzer
    from vspan.collectors import warmup as collector

    roles = _ROLES if args.role == "all" else (args.role,)
    if args.compile:
        for role, module in (("analyzer", analyzer), ("collector", collector)):
            if role in roles and module.warm(say) is None:
                say(f"{role} kernels already compiled")
    here = _kernels.cache_dir()
    print(f"cache     {here if here is not None else '(no writable place: compiled every run)'}")
    print(f"digest    {_kernels.DIGEST}")
    for role in roles:
        print(f"{role:<9} {'compiled' if _kernels.warmed(role) else 'not compiled yet'}")
    return 0 if here is not None else 1
