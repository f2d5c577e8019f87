"""``vspan demo``: a live analyzer fed by real collectors on a simulated datacenter.

One process runs everything, on 127.0.0.1 only: an ``Analyzer`` (UDP tunnel on a free port,
TCP off, the example port-profiles, a temporary data folder unless ``--data-dir``), its HTTP
server (API, control plane, dashboard), and one ``Collector`` per simulated host, each in a
thread with its ``SimulatedHostSource``, sending over UDP and registering its VM ports with
the control plane (so live migrations show up as the VMs' ports move). It runs until Ctrl-C
or ``--duration``, stops everything in order and prints a summary.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vspan.analysis.service.analyzer import Analyzer
    from vspan.api.server import HttpServer
    from vspan.collectors.agent import Collector
    from vspan.collectors.simulator.datacenter import SimulatedDatacenter

__all__ = ["add_parser"]

DEFAULT_HTTP = "127.0.0.1:8470"
EXAMPLE_PROFILES = Path(__file__).resolve().parents[1] / "examples" / "profiles.yaml"
"""The example port-profiles shipped with vspan (also ``docs/examples/profiles.yaml``)."""


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run an analyzer and collectors on a simulated datacenter",
        description="Simulate a datacenter (hosts, VMs in tiers, daily rhythm, policy "
        "violations, live migrations) and watch it live: real collectors send its VM "
        "traffic to a real analyzer, whose dashboard and API are served on HTTP.",
    )
    p.add_argument("--hosts", type=int, default=4, metavar="N", help="hypervisors (default 4)")
    p.add_argument("--vms-per-host", type=int, default=6, metavar="M",
                   help="VMs on each host (default 6)")  # fmt: skip
    p.add_argument("--http", default=DEFAULT_HTTP, metavar="ADDR:PORT",
                   help=f"dashboard and API (default {DEFAULT_HTTP}, or a free port)")  # fmt: skip
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")  # fmt: skip
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep the analyzer's store in DIR (default: a temporary one)")  # fmt: skip
    p.add_argument("--rate", type=float, default=3000.0, metavar="FRAMES_PER_S",
                   help="frames per second at the busiest hour (default 3000)")  # fmt: skip
    p.add_argument("--time-scale", type=float, default=60.0, metavar="X",
                   help="simulated seconds per real second (default 60)")  # fmt: skip
    p.add_argument("--migrate-every", type=float, default=600.0, metavar="SIM_S",
                   help="mean simulated seconds between live migrations (default 600)")  # fmt: skip
    p.add_argument("--profiles", metavar="FILE",
                   help="port-profiles YAML (default: the example shipped with vspan)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="simulation seed (default 1)")
    p.set_defaults(run=run)


def _http_port(host: str, port: int) -> tuple[int, bool]:
    """``port``, or 0 (a free one) when it is taken; and whether it was taken."""
    if port == 0:
        return 0, False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return 0, True
    return port, False


def _collect(collector: Collector, done: threading.Event) -> None:
    collector.start(time.monotonic())
    try:
        while not done.is_set():
            collector.step(time.monotonic(), poll_s=0.05)
        # a last look at the ports before stopping: a VM that migrated since the last
        # refresh (every 0.5 s) is registered on its new host, so the analyzer sees the move
        collector.refresh_ports(time.monotonic())
    finally:
        collector.stop()


def _start_http(analyzer: Analyzer, address: str) -> HttpServer:
    from vspan.api.server import HttpServer, create_app
    from vspan.yamlconf import parse_address

    host, wanted = parse_address(address, field="http")
    port, busy = _http_port(host, wanted)
    server = HttpServer(create_app(analyzer), host, port)
    server.start()
    if busy:
        print(f"vspan demo: {host}:{wanted} is busy; serving on port {server.port} instead")
    return server


def _collectors(dc: SimulatedDatacenter, udp: tuple[str, int], control_url: str) -> list[Collector]:
    from vspan.collectors.agent import Collector, CollectorSettings
    from vspan.collectors.control.client import ControlClient
    from vspan.collectors.forward.forwarder import UdpSender

    out = []
    for h in range(dc.config.hosts):
        source = dc.source(h)
        settings = CollectorSettings(collector_id=source.collector_id, host=source.name,
                                     refresh_interval_s=0.5, heartbeat_interval_s=30.0)  # fmt: skip
        out.append(Collector(settings, source=source, directory=source, sender=UdpSender(udp),
                             control=ControlClient(control_url, source.collector_id)))  # fmt: skip
    return out


def _drain(analyzer: Analyzer, collectors: list[Collector], timeout_s: float = 2.0) -> None:
    """Give the analyzer up to ``timeout_s`` to take in what the collectors sent last."""
    sent = sum(c.counters()["frames_sent"] for c in collectors)
    deadline = time.monotonic() + timeout_s
    while analyzer.engine is not None and time.monotonic() < deadline:
        if analyzer.engine.counters()["frames"] >= sent:
            return
        time.sleep(0.05)


def _stored_flow_uids(folder: Path) -> set[str]:
    """The flows a reused ``--data-dir`` already holds (so the summary counts this run's)."""
    from vspan.analysis.store.store import Store
    from vspan.errors import VspanError

    try:
        with Store(folder, read_only=True) as store:
            flows = store.query_flows(limit=None, columns=["flow_uid"])
    except (VspanError, OSError):  # no store yet (or none readable): nothing from before
        return set()
    return set(flows["flow_uid"].astype(str))


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n:,}" for k, n in sorted(counts.items()) if n)


def _frames_line(analyzer: Analyzer, collectors: list[Collector]) -> str:
    """What became of the frames captured: mirrored, left out on purpose (named), sent,
    lost (named), received."""
    totals: dict[str, Any] = {"frames": 0, "exported": 0, "frames_sent": 0, "waiting": 0}
    not_mirrored: dict[str, int] = {}
    lost: dict[str, int] = {}
    for c in collectors:
        counts = c.counters()
        for key in totals:
            totals[key] += counts[key]
        for reason, n in counts["not_mirrored"].items():
            not_mirrored[reason] = not_mirrored.get(reason, 0) + n
        for reason, n in counts["lost"].items():
            lost[reason] = lost.get(reason, 0) + n
    left_out = sum(not_mirrored.values())
    why = f": {_reasons(not_mirrored)}" if left_out else ""
    if not_mirrored.get("duplicates"):
        why += (
            "; duplicates are the delivery copies of frames between two VMs of a host, "
            "mirrored once at the sender"
        )
    engine = analyzer.counters().get("engine", {})
    waiting = f", {totals['waiting']:,} not sent yet" if totals["waiting"] else ""
    return (
        f"{totals['frames']:,} frames captured on VM ports, {totals['exported']:,} mirrored "
        f"({left_out:,} not mirrored on purpose{why}), {totals['frames_sent']:,} sent"
        f"{waiting}, lost: {_reasons(lost) or 'none'}; {engine.get('frames', 0):,} received"
    )


def _migrations_line(
    analyzer: Analyzer, dc: SimulatedDatacenter, collectors: list[Collector]
) -> str:
    """Migrations simulated and recorded, and why they differ when they do."""
    written = analyzer.counters().get("store", {}).get("written", {})
    recorded = int(written.get("migrations", {}).get("rows", 0))
    reached = {c.settings.host: c.source.next_window for c in collectors}  # type: ignore[attr-defined]
    seen = [m for m in dc.migrations if m.window < reached.get(m.to_host, 0)]
    line = f"{len(dc.migrations)} live migrations simulated, {recorded} recorded by the analyzer"
    notes = []
    if len(seen) < len(dc.migrations):
        notes.append(f"{len(dc.migrations) - len(seen)} in a window its new host's collector "
                     "had not captured yet when the demo stopped")  # fmt: skip
    if recorded < len(seen):
        notes.append(f"{len(seen) - recorded} not seen: a VM that moves again before its "
                     "collectors' next look at their ports (every 0.5 s) is seen on its last "
                     "host only")  # fmt: skip
    return line + (f" ({'; '.join(notes)})" if notes else "")


def _summary(
    analyzer: Analyzer, dc: SimulatedDatacenter, collectors: list[Collector], before: set[str]
) -> None:
    """The run in two lines: the frames, then what the analyzer stored (this run only, also
    with a reused ``--data-dir``)."""
    from vspan.analysis.store.store import Store

    with Store(analyzer.data_dir, read_only=True) as store:
        flows = store.query_flows(limit=None, columns=["flow_uid", "policy_verdict"])
    flows = flows[~flows["flow_uid"].astype(str).isin(before)]
    denied = int((flows["policy_verdict"] == "deny").sum())
    print(f"vspan demo: {_frames_line(analyzer, collectors)}")
    print(
        f"vspan demo: {len(flows):,} flows stored, {denied:,} violating the port-profiles; "
        f"{_migrations_line(analyzer, dc, collectors)}"
    )


def run(args: argparse.Namespace) -> int:
    """Start the analyzer, the HTTP server and the collectors; run; stop; summarize."""
    from vspan.analysis.service.analyzer import Analyzer
    from vspan.analysis.service.config import AnalyzerConfig
    from vspan.collectors.simulator.datacenter import SimulatedDatacenter, SimulatorConfig
    from vspan.errors import ConfigError

    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    from vspan.analysis import warmup as analyzer_kernels
    from vspan.cli.kernels import say
    from vspan.collectors import warmup as collector_kernels

    for kernels in (analyzer_kernels, collector_kernels):  # first run: compiled, and said
        kernels.warm(say)
    profiles = args.profiles or (str(EXAMPLE_PROFILES) if EXAMPLE_PROFILES.is_file() else None)
    dc = SimulatedDatacenter(SimulatorConfig(
        hosts=args.hosts, vms_per_host=args.vms_per_host, seed=args.seed, rate=args.rate,
        time_scale=args.time_scale, start_ns=time.time_ns(), migration_every_s=args.migrate_every,
    ))  # fmt: skip
    keep = args.data_dir is not None
    folder = Path(args.data_dir) if keep else Path(tempfile.mkdtemp(prefix="vspan-demo-"))
    before = _stored_flow_uids(folder) if keep else set()
    analyzer = Analyzer(AnalyzerConfig(udp="127.0.0.1:0", tcp=None, http=args.http,
                                       data_dir=str(folder), profiles=profiles))  # fmt: skip
    done = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in signals}
    analyzer.start()
    server: HttpServer | None = None
    collectors: list[Collector] = []
    threads: list[threading.Thread] = []
    try:
        server = _start_http(analyzer, args.http)
        base = f"http://{server.config.host}:{server.port}"
        assert analyzer.engine is not None
        analyzer.engine.ready.wait(60.0)  # its kernels loaded (compiled above, if first)
        collectors = _collectors(dc, analyzer.addresses()["udp"], base)
        threads = [
            threading.Thread(target=_collect, args=(c, done), name=f"demo-{c.settings.host}")
            for c in collectors
        ]
        for t in threads:
            t.start()
        print(
            f"vspan demo: {args.hosts} hosts × {args.vms_per_host} VMs, ~{args.rate:,.0f} frames/s "
            f"at peak, simulated time ×{args.time_scale:g}; profiles: {profiles or 'none'}; "
            f"data in {folder}"
        )
        print(f"vspan demo: dashboard {base}/  (Ctrl-C to stop)", flush=True)
        done.wait(args.duration)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=10)
        _drain(analyzer, collectors)
        if server is not None:
            server.stop()
        analyzer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _summary(analyzer, dc, collectors, before)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()
    return 0
