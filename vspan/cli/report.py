"""``vspan report CAPTURE...``: per-VM flows and groupings over capture files."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from typing import IO, Any

__all__ = ["add_parser"]

_PROGRESS_MIN_BYTES = 32 << 20
"""Show a progress bar (on a terminal) for inputs at least this large."""


def add_parser(sub: Any) -> None:
    """Register ``report`` on the top-level subparsers."""
    from vspan.analysis.records.options import FORMATS, GROUPINGS, SORTS

    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="per-VM flows and traffic summaries from capture files",
        description="Read pcap/pcapng captures (VN-tagged, E-tagged or plain Ethernet) and "
        "print per-VM flows or groupings. Undecodable frames are summarised on stderr.",
    )
    p.add_argument("captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng files")
    p.add_argument("--inventory", metavar="FILE", help="inventory YAML: hosts and VMs")
    p.add_argument(
        "--host",
        metavar="NAME",
        help="the host the captures were taken on, when the files do not name it",
    )
    p.add_argument("--by", choices=GROUPINGS, default="flow", help="grouping (default: flow)")
    p.add_argument("--top", type=int, metavar="N", help="only the first N rows")
    p.add_argument("--sort", choices=SORTS, default="bytes", help="sort key (default: bytes)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds without packets that end a flow (default 60)",
    )
    p.add_argument(
        "--active-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds after which a long flow is cut (default 300)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(run=run)


def _progress(enabled: bool, stack: ExitStack) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = stack.enter_context(
        Progress(
            "reading",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=None,
        )
    )
    task = bar.add_task("read", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update


def _summary(report: Any, err: IO[str]) -> None:
    for f in report.files:
        if f.partial:
            print(
                f"vspan report: {f.path}: PARTIAL: read {f.frames} frames, then: {f.error}",
                file=err,
            )
    bad = [(reason, n) for category, reason, n in report.outcomes if category != "flow"]
    total = sum(n for _, _, n in report.outcomes)
    in_flows = total - sum(n for _, n in bad)
    print(
        f"vspan report: {total:,} frames, {in_flows:,} in {len(report.records):,} flows", file=err
    )
    for reason, n in bad:
        print(f"vspan report: not decodable: {n:,} frames {reason}", file=err)
    resets = report.flow_counters.get("clock_resets", 0)
    if resets:
        print(
            f"vspan report: {resets:,} times a host's capture time went back by more than the "
            "idle timeout (a file's records not in time order, or a clock set back): its "
            "frames from there on follow a new clock",
            file=err,
        )
    late = report.flow_counters.get("late_frames", 0)
    if late:
        print(
            f"vspan report: {late:,} frames too far out of time order to join their flow "
            "(a file's records not in time order): each is a flow of its own",
            file=err,
        )


def run(args: argparse.Namespace) -> int:
    """Run the report; exit status 0, or 1 when a capture could only be read in part."""
    from vspan.analysis import warmup
    from vspan.analysis.flows.table import FlowConfig
    from vspan.analysis.report import analyze_captures, import_in_background
    from vspan.cli.kernels import say
    from vspan.errors import ConfigError
    from vspan.inventory import Inventory

    if args.top is not None and args.top < 1:
        raise ConfigError("--top must be at least 1")
    if args.format == "parquet" and args.output is None and sys.stdout.isatty():
        raise ConfigError("--format parquet writes binary data: give -o FILE")
    for path in args.captures:
        if not os.path.isfile(path):
            raise ConfigError(f"no such capture file: {path}")
    inventory = Inventory.load(args.inventory) if args.inventory else None
    warmup.warm(say)  # the first run on this machine compiles the kernels, and says so
    config = FlowConfig(idle_timeout_s=args.idle_timeout, active_timeout_s=args.active_timeout)
    size = sum(os.path.getsize(p) for p in args.captures)
    show = not args.no_progress and sys.stderr.isatty() and size >= _PROGRESS_MIN_BYTES
    if args.by != "flow" or args.format == "table":
        # pandas groups and lays out the rows; it loads while the capture is read.
        import_in_background("pandas")
    with ExitStack() as stack:
        progress = _progress(show, stack)
        report = analyze_captures(
            args.captures,
            inventory=inventory,
            host=args.host,
            flow_config=config,
            progress=progress,
        )
    from vspan.analysis.records.ranking import top
    from vspan.analysis.records.render import render

    if args.by == "flow":
        table: Any = top(report.records, sort=args.sort, n=args.top, by=args.by)
    else:
        from vspan.analysis.records.groupings import group_flows

        table = top(group_flows(report.flows, args.by), sort=args.sort, n=args.top, by=args.by)
    if args.output:
        with open(args.output, "wb") as out:
            render(table, args.format, out)
    else:
        render(table, args.format)
    _summary(report, sys.stderr)
    return 1 if report.partial else 0
