"""``vspan analyze``: receive collectors' tunnels, keep per-VM flows, serve the API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import fields
from typing import Any

__all__ = ["add_parser"]

log = logging.getLogger("vspan.analyze")

_HELP = {
    "udp": "tunnel over UDP, ADDR:PORT ('off' to disable)",
    "tcp": "tunnel over TCP, ADDR:PORT ('off' to disable)",
    "http": "API, dashboard and control plane, ADDR:PORT",
    "data_dir": "store and packet ring (default ~/.local/share/vspan)",
    "inventory": "static inventory YAML (collectors also register theirs)",
    "profiles": "port-profiles YAML",
    "keys": "collector keys YAML (collector_id: hex key)",
    "tokens": "API tokens YAML (token: read|admin|collector[:ID]); without it only "
    "loopback clients are served",
    "insecure_listen": "without --tokens, serve every client of a non-loopback --http "
    "address with no token at all (refused otherwise)",
    "retention_basis": "age stored rows by 'ingest' time (default) or by 'capture' time",
}


def add_parser(sub: Any) -> None:
    """Register ``analyze`` on the top-level subparsers."""
    from vspan.analysis.service.config import AnalyzerConfig

    p: argparse.ArgumentParser = sub.add_parser(
        "analyze",
        help="run the analyzer: receive tunnels, keep flows, serve the API",
        description="Receive VN-tagged frames from collectors, keep per-VM flows, policy "
        "hits and recent packets, and serve the HTTP API. With no arguments it listens on "
        "loopback only. Every setting of --config is also a flag; flags win.",
    )
    p.add_argument("--config", metavar="FILE", help="analyzer settings (YAML)")
    for f in fields(AnalyzerConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind.startswith("bool"):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_HELP.get(f.name, f.name.replace("_", " ")),
            )
        else:
            conv: Any = (
                int if kind.startswith("int") else float if kind.startswith("float") else str
            )
            p.add_argument(
                flag,
                type=conv,
                default=None,
                metavar=f.name.upper(),
                help=_HELP.get(f.name, f.name.replace("_", " ")),
            )
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> Any:
    from vspan.analysis.service.config import AnalyzerConfig

    base = AnalyzerConfig.load(args.config) if args.config else AnalyzerConfig()
    given: dict[str, Any] = {}
    for f in fields(AnalyzerConfig):
        value = getattr(args, f.name)
        if value is not None:
            given[f.name] = None if f.name in ("udp", "tcp") and value == "off" else value
    return base.merged(given, none_means_unset=False)


def _access(config: Any) -> tuple[dict[str, str] | None, bool]:
    """The API tokens, and whether to serve every client without one: a non-loopback
    ``--http`` address needs ``--tokens`` or ``--insecure-listen`` (then a WARNING)."""
    from vspan.api.auth import is_loopback_host, load_tokens
    from vspan.errors import ConfigError
    from vspan.yamlconf import parse_address

    tokens = load_tokens(config.tokens) if config.tokens else None
    host, _ = parse_address(config.http, field="http")
    if tokens or is_loopback_host(host):
        return tokens, False
    if not config.insecure_listen:
        raise ConfigError(
            f"--http {config.http} is not a loopback address and no --tokens file is given: "
            "anyone who reaches it could read every flow and change sessions and the "
            "inventory. Give --tokens FILE (token: read|admin|collector:ID), or "
            "--insecure-listen to serve every client without a token",
            field="http",
        )
    log.warning(
        "insecure listen: serving the API, dashboard and control plane on %s without "
        "tokens to every client; anyone who reaches it can read every flow and change "
        "sessions and the inventory (--insecure-listen)",
        config.http,
    )
    return None, True


def run(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM (or --duration); then finish flows and close the store."""
    from vspan.analysis.service.analyzer import Analyzer
    from vspan.api.server import HttpServer, create_app
    from vspan.yamlconf import parse_address

    # What the analyzer's parts log (a store deleting rows, an append losing some) goes to
    # stderr with the start and exit lines; INFO and up.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="vspan analyze: %(levelname)s: %(message)s"
    )
    config = _settings(args)
    tokens, open_access = _access(config)
    analyzer = Analyzer(config)
    done = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        done.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    analyzer.start()
    server = None
    try:
        host, port = parse_address(config.http, field="http")
        app = create_app(analyzer, tokens=tokens, open_access=open_access)
        server = HttpServer(app, host, port)
        server.start()
        where = ", ".join(f"{k} {a[0]}:{a[1]}" for k, a in analyzer.addresses().items())
        print(
            f"vspan analyze: receiving on {where or 'nothing'}; "
            f"API on http://{host}:{server.port}/ ; data in {analyzer.data_dir}",
            file=sys.stderr,
            flush=True,
        )
        done.wait(args.duration)
    finally:
        if server is not None:
            server.stop()
        analyzer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"vspan analyze: stopped: {_summary(analyzer.counters())}", file=sys.stderr)
    return 0


def _summary(counters: dict[str, Any]) -> str:
    """Frames received, flows finished, and flow records the store wrote — and those it did
    not, by reason: a "stored" here is a row in the store."""
    engine, writer = counters.get("engine", {}), counters.get("store_writer", {})
    lost = {
        k: v
        for k, v in writer.items()
        if k.startswith(("dropped{flows", "rejected{flows", "errors{flows"))
    }
    text = (
        f"{engine.get('frames', 0):,} frames, {engine.get('flows_finished', 0):,} flows "
        f"finished, {writer.get('rows_written{flows}', 0):,} flow records stored"
    )
    if lost:
        detail = ", ".join(f"{k} {v:,}" for k, v in sorted(lost.items()))
        text += f", {sum(lost.values()):,} not stored ({detail})"
    coerced = {k: v for k, v in writer.items() if k.startswith("coerced{flows")}
    if coerced:
        text += ", values stored as NULL: " + ", ".join(f"{k} {v:,}" for k, v in coerced.items())
    return text
