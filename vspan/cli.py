"""The ``vspan`` command: one subcommand per job (report, and the service commands as they land)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vspan import __version__
from vspan.errors import VspanError

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    from vspan import cli_analyze, cli_collect, cli_demo, cli_predict, cli_query, cli_report

    parser = argparse.ArgumentParser(
        prog="vspan",
        description="Traffic visibility and remote SPAN for virtualized datacenters.",
    )
    parser.add_argument("--version", action="version", version=f"vspan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_report.add_parser(sub)
    cli_demo.add_parser(sub)
    cli_collect.add_parser(sub)
    cli_analyze.add_parser(sub)
    cli_predict.add_parser(sub)
    cli_query.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vspan`` console script; returns the exit status."""
    parser = _build_parser()
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
