"""Commands that read what an analyzer stored: ``vspan flows``, ``vspan policy hits``,
``vspan policy violations``, ``vspan migrations``, ``vspan collectors`` and ``vspan export``.

A query command asks a running analyzer over HTTP (``--analyzer URL``, the read API of
``api.routers``) or opens its data directory's store read-only (``--data-dir DIR``, the
same ``analysis.queries`` functions the API calls). Either way the rows arrive as the API's
JSON and are printed by ``analysis.render``, so both give the same output. DuckDB lets
only one process open a store that is being written: while the analyzer runs, ask it.

``vspan export`` reads the packet ring of a data directory (``analysis.export``); the ring
is plain files, so it works beside a running analyzer (except ``--flow``, which needs the
store).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from vspan.errors import ConfigError, VspanError

if TYPE_CHECKING:
    import pandas as pd

    from vspan.analysis.store.store import Store

__all__ = ["TOKEN_ENV", "AnalyzerError", "add_parsers"]

TOKEN_ENV: Final = "VSPAN_TOKEN"
"""The environment variable holding the API bearer token for ``--analyzer``."""

_TIMEOUT_S: Final = 30.0
_BUSY: Final = ("Could not set lock", "different configuration")
"""DuckDB's words when another process (or this one) has the store open for writing."""
_TIMES: Final = ("first", "last", "time", "last_hit", "heartbeat")
_TIME_HELP: Final = "ISO 8601, epoch seconds, or before now: 15m, 2h (or --since=-15m)"


class AnalyzerError(VspanError):
    """The analyzer cannot be reached, or refused the query (its reason is kept)."""


@dataclass(frozen=True, slots=True)
class _Query:
    """A query command: its endpoint, the JSON key of its rows, the flags it sends."""

    path: str
    key: str
    params: tuple[str, ...]


_QUERIES: Final = {
    "flows": _Query(
        "/api/v1/flows", "flows",
        ("vm", "host", "scope", "proto", "ip", "port", "since", "until", "sort", "limit", "cursor"),
    ),
    "hits": _Query("/api/v1/policies/hits", "hits", ("vm", "profile")),
    "violations": _Query("/api/v1/violations", "violations", ("vm", "since", "until", "limit")),
    "migrations": _Query("/api/v1/migrations", "migrations", ("vm", "since", "until", "limit")),
    "collectors": _Query("/api/v1/collectors", "collectors", ()),
}  # fmt: skip
_FLAGS: Final[dict[str, dict[str, Any]]] = {
    "vm": {"metavar": "NAME", "help": "VM name or UUID (either side of a flow); a name the "
           "VM had before finds what was stored under it"},
    "host": {"metavar": "NAME", "help": "observing host, or either side's host"},
    "scope": {"choices": ("intra-host", "cross-host", "external")},
    "proto": {"metavar": "P", "help": "protocol number or tcp, udp, icmp, icmpv6, sctp"},
    "ip": {"metavar": "ADDR", "help": "address of either side"},
    "port": {"metavar": "N", "type": int, "help": "port of either side"},
    "since": {"metavar": "T", "help": f"at or after T: {_TIME_HELP}"},
    "until": {"metavar": "T", "help": "before T"},
    "sort": {"metavar": "KEY", "default": "-last", "help": "first, last, bytes or packets; "
             "descending as --sort=-KEY (default -last)"},
    "limit": {"metavar": "N", "type": int, "default": 100, "help": "rows (default 100)"},
    "cursor": {"metavar": "C", "help": "continue after a page (printed on stderr)"},
    "profile": {"metavar": "NAME", "help": "port-profile"},
}  # fmt: skip


def add_parsers(sub: Any) -> None:
    """Register the query commands and ``export`` on the top-level subparsers."""
    for name, text in (
        ("flows", "flows (open ones too, from a running analyzer), filtered, a page at a time"),
        ("migrations", "VM migrations between hosts"),
        ("collectors", "each collector's counters, rates, loss and drops"),
    ):
        _query_parser(sub, name, name, text)
    policy = sub.add_parser("policy", help="port-profile hits and violations")
    what = policy.add_subparsers(dest="policy_command", metavar="WHAT", required=True)
    _query_parser(what, "hits", "hits", "per rule and VM: flows, packets, bytes decided")
    _query_parser(what, "violations", "violations", "denied flows, the most recent first")
    _export_parser(sub)


def _query_parser(sub: Any, command: str, query: str, text: str) -> None:
    description = f"{text[0].upper()}{text[1:]}; from a running analyzer or its data directory."
    p: argparse.ArgumentParser = sub.add_parser(command, help=text, description=description)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--analyzer", metavar="URL", help="a running analyzer's HTTP address")
    source.add_argument("--data-dir", metavar="DIR", help="an analyzer's data directory")
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"with --analyzer: the API bearer token (read role; default: ${TOKEN_ENV})",
    )
    for flag in _QUERIES[query].params:
        p.add_argument(f"--{flag}", **_FLAGS[flag])
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(run=_run_query, query=query)


def _run_query(args: argparse.Namespace) -> int:
    """Print the rows of one query; 0."""
    from vspan.analysis.records.render import render
    from vspan.analysis.store import queries

    spec = _QUERIES[args.query]
    params = {k: getattr(args, k) for k in spec.params if getattr(args, k) is not None}
    if args.analyzer is not None:
        doc = _get(args.analyzer, spec.path, params, args.token or os.environ.get(TOKEN_ENV))
        rows, cursor = doc[spec.key], doc.get("next_cursor")
    else:
        with _open_store(args.data_dir) as store:
            rows, cursor = _local(args.query, store, params, time.time())
    columns = queries.FLOW_COLUMNS if args.query in ("flows", "violations") else {
        "hits": queries.HIT_COLUMNS, "migrations": queries.MIGRATION_COLUMNS,
        "collectors": (*queries.COLLECTOR_COLUMNS, "capture"),
    }[args.query]  # fmt: skip
    if args.query == "collectors" and args.format != "json":
        rows, columns = [_flat_capture(r) for r in rows], (*columns[:-1], *_CAPTURE_COLUMNS)
    render(_frame(rows, columns, args.format), args.format)
    if cursor is not None:
        print(f"vspan {args.command}: more rows: --cursor {cursor}", file=sys.stderr)
    return 0


def _local(
    query: str, store: Store, params: dict[str, Any], now: float
) -> tuple[list[dict[str, Any]], str | None]:
    """The rows (as the API's JSON) and next cursor of a query on an opened store."""
    from vspan.analysis.store import queries as q

    if query == "flows":
        page = q.flows(store, **params, now=now)
        return q.json_rows(page.flows), page.next_cursor
    if query == "hits":
        return q.json_rows(q.policy_hits(store, **params)), None
    if query == "collectors":
        return q.json_rows(q.collectors(store)), None
    run = q.violations if query == "violations" else q.migrations
    return q.json_rows(run(store, **params, now=now)), None


_CAPTURE_COLUMNS: Final = (
    "heartbeat", "captured", "exported", "waiting", "capture_drops", "not_mirrored",
)  # fmt: skip
"""A collector's ``capture`` (its latest heartbeat) as columns of a table or CSV."""


def _flat_capture(row: dict[str, Any]) -> dict[str, Any]:
    """A ``collectors`` row with its ``capture`` object as ``_CAPTURE_COLUMNS``: the
    heartbeat's time, frames captured, exported and waiting, and the frames lost
    (``capture_drops``) apart from those not mirrored on purpose, each as ``reason=n;...``
    (the non-zero ones; ``none``)."""
    capture = row.get("capture") or {}
    out = {k: v for k, v in row.items() if k != "capture"}

    def reasons(counts: dict[str, int] | None) -> str | None:
        if counts is None:
            return None
        return ";".join(f"{k}={n}" for k, n in sorted(counts.items()) if n) or "none"

    out |= {
        "heartbeat": capture.get("time"), "captured": capture.get("frames"),
        "exported": capture.get("exported"), "waiting": capture.get("waiting"),
        "capture_drops": reasons(capture.get("drops")),
        "not_mirrored": reasons(capture.get("not_mirrored")),
    }  # fmt: skip
    return out


def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str) -> pd.DataFrame:
    """JSON rows as a frame for ``render``: times as UTC datetimes, integer columns as
    nullable integers (JSON tells 3 from 3.0); UUIDs left out of tables, maps as text."""
    import pandas as pd

    data: dict[str, Any] = {}
    for column in columns:
        if fmt == "table" and column.endswith("uuid") and column != "flow_uid":
            continue
        values = [row.get(column) for row in rows]
        kinds = {type(v) for v in values} - {type(None)}
        if column in _TIMES:
            data[column] = pd.to_datetime(pd.Series(values, dtype=object), utc=True)
        elif kinds == {int}:
            data[column] = pd.array(values, dtype="Int64")
        elif kinds and kinds <= {int, float}:
            data[column] = pd.array(values, dtype="float64")
        elif kinds == {dict} and fmt != "json":
            data[column] = [";".join(f"{k}={n}" for k, n in (v or {}).items()) for v in values]
        else:
            data[column] = pd.Series(values, dtype=object)
    return pd.DataFrame(data, index=pd.RangeIndex(len(rows)))


def _get(base: str, path: str, params: dict[str, Any], token: str | None = None) -> Any:
    """GET ``base + path`` with query ``params`` (and the bearer ``token``); the JSON
    answer, or ``AnalyzerError``."""
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ConfigError(f"expected a URL like http://127.0.0.1:8080, got {base!r}",
                          field="--analyzer")  # fmt: skip
    url = base.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token.strip()}")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AnalyzerError(
            f"the analyzer refused the query (HTTP {exc.code}): {_detail(exc)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AnalyzerError(f"cannot reach the analyzer at {base}: {reason}") from exc
    except ValueError as exc:
        raise AnalyzerError(f"{url}: the answer is not JSON: {exc}") from exc


def _detail(exc: urllib.error.HTTPError) -> str:
    """The ``detail`` of a FastAPI error answer, as one line."""
    try:
        detail = json.loads(exc.read())["detail"]
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    return str(detail)


@contextmanager
def _open_store(data_dir: str) -> Iterator[Store]:
    """The store of ``data_dir``, read-only; a clear error while an analyzer writes it."""
    from vspan.analysis.store.store import Store, StoreError

    if not os.path.isdir(data_dir):
        raise ConfigError(f"no such data directory: {data_dir}")
    store = Store(data_dir, read_only=True)
    try:
        store.start()
    except StoreError as exc:
        if any(words in str(exc) for words in _BUSY):
            raise StoreError(
                f"{data_dir}: the store is in use by a running analyzer; use --analyzer URL"
            ) from exc
        raise
    try:
        yield store
    finally:
        store.stop()


# --- vspan export ------------------------------------------------------------------------


def _export_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="write the packet ring's frames of a VM, host or flow to pcapng for Wireshark",
        description="Write the frames of the data directory's packet ring that match every "
        "filter to a pcapng (one interface per host/VM, comments naming the VMs) or pcap.",
    )
    p.add_argument("--vm", metavar="NAME", help="VM name or UUID (frames to or from it)")
    p.add_argument("--host", metavar="NAME", help="captured by this host's collector")
    p.add_argument("--flow", metavar="ID", help="a stored flow: flow_uid, or flow_id")
    p.add_argument("--ip", metavar="ADDR", help="address of either side")
    p.add_argument("--port", metavar="N", type=int, help="port of either side")
    p.add_argument("--since", metavar="T", help=f"captured at or after T: {_TIME_HELP}")
    p.add_argument("--until", metavar="T", help="captured before T")
    p.add_argument("--strip-tag", action="store_true", help="remove VN-Tag/E-TAG headers")
    p.add_argument("--format", choices=("pcapng", "pcap"), default="pcapng")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="file to write")
    p.add_argument("--data-dir", metavar="DIR", required=True, help="the analyzer's data dir")
    p.add_argument("--inventory", metavar="FILE", help="inventory YAML: hosts and VMs")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    """Export and print one line of summary; 1 when a segment could only be read in part."""
    from vspan.analysis import warmup
    from vspan.analysis.ring.export import export
    from vspan.analysis.store.queries import parse_time
    from vspan.cli.kernels import say
    from vspan.inventory import Inventory

    if not os.path.isdir(os.path.join(args.data_dir, "ring")):
        raise ConfigError(f"no packet ring in {args.data_dir} (expected {args.data_dir}/ring)")
    warmup.warm(say)
    now = time.time()
    since, until = (
        None if t is None else parse_time(t, now, field=f"--{name}")
        for name, t in (("since", args.since), ("until", args.until))
    )
    inventory = Inventory.load(args.inventory) if args.inventory else None
    flow = args.flow
    if flow is not None and flow.isdigit():
        flow = int(flow)
    with ExitStack() as stack:
        store = None if flow is None else stack.enter_context(_open_store(args.data_dir))
        result = export(
            args.data_dir, args.output, vm=args.vm, host=args.host, flow=flow, ip=args.ip,
            port=args.port, since=since, until=until, strip_tag=args.strip_tag,
            fmt=args.format, inventory=inventory, store=store,
        )  # fmt: skip
    print(
        f"vspan export: {result.frames_written:,} frames written to {result.path} "
        f"({result.segments_scanned} segments scanned, {result.segments_skipped} skipped)"
    )
    for error in result.errors:
        print(f"vspan export: PARTIAL: {error}", file=sys.stderr)
    return 1 if result.errors else 0
