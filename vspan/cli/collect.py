"""``vspan collect``: capture VM traffic on this host and ship it VN-tagged to an analyzer."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

__all__ = ["TOKEN_ENV", "add_parser"]

TOKEN_ENV = "VSPAN_CONTROL_TOKEN"
"""The environment variable that holds the control-plane token (keeps it out of ``ps``)."""


def add_parser(sub: Any) -> None:
    """Register ``collect`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "collect",
        help="capture VM traffic at the virtual switch and forward it VN-tagged (remote SPAN)",
        description="Capture VM traffic on this hypervisor's vswitch ports, tag every frame "
        "with a VN-Tag (source and destination vif) and send it to a vspan analyzer. Use "
        "--config FILE, or --bridge for a Linux bridge, or --replay to replay a capture.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="collector configuration (YAML)")
    src.add_argument(
        "--bridge", metavar="BRIDGE", help="capture every port of this Linux bridge but uplinks"
    )
    src.add_argument("--replay", metavar="CAPTURE", help="replay a pcap/pcapng taken on a host")
    p.add_argument(
        "--uplink",
        action="append",
        default=[],
        metavar="PORT",
        help="a bridge port that is not a VM (repeatable; default eth*, en*, bond*, ...)",
    )
    p.add_argument("--analyzer", metavar="HOST:PORT", help="where to send (default port 47470)")
    p.add_argument("--transport", choices=("udp", "tcp"), default=None, help="default udp")
    p.add_argument("--collector-id", type=int, metavar="N", help="this host's id (default 1)")
    p.add_argument("--host-name", metavar="NAME", help="this host's name (default: hostname)")
    p.add_argument("--key-file", metavar="F", help="hex AUTH key shared with the analyzer")
    p.add_argument("--snaplen", type=int, metavar="N", help="bytes kept of each frame")
    p.add_argument("--sample", type=int, metavar="N", help="keep 1 frame in N per port")
    p.add_argument("--filter", metavar="BPF", help="BPF filter run in the kernel")
    p.add_argument(
        "--max-message",
        type=int,
        metavar="BYTES",
        help="largest tunnel message (UDP default 1400: fits a 1,500-byte path)",
    )
    p.add_argument("--control", metavar="URL", help="the analyzer's HTTP control plane")
    p.add_argument(
        "--control-token",
        metavar="TOKEN",
        help="bearer token for the control plane (the analyzer's collector:ID token; "
        f"default: ${TOKEN_ENV}, else the config file's control_token)",
    )
    p.add_argument("--state-dir", metavar="DIR", help="where the vif assignment is kept")
    p.add_argument("--inventory", metavar="FILE", help="with --replay: hosts and VMs (MACs)")
    p.add_argument("--host", metavar="NAME", help="with --replay: the inventory host replayed")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="with --replay: pace at X times the original speed (default 1)",
    )
    speed.add_argument("--max-speed", action="store_true", help="with --replay: no pacing")
    p.add_argument("--stats-interval", type=float, metavar="S", help="seconds between stats")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(run=run)


def _build(args: argparse.Namespace) -> tuple[Any, float]:
    """The collector the arguments describe, and its stats interval."""
    from vspan.collectors.agent import Collector, CollectorSettings
    from vspan.collectors.capture.afpacket import AfPacketConfig, AfPacketSource
    from vspan.collectors.capture.replay import ReplaySource
    from vspan.collectors.config import CollectorFile, default_state_dir, read_key_file
    from vspan.collectors.control.client import ControlClient
    from vspan.collectors.discovery.ports import Discovery
    from vspan.collectors.discovery.sources import DEFAULT_UPLINKS, BridgeSource
    from vspan.collectors.discovery.vifs import VifTable
    from vspan.collectors.forward.forwarder import TcpSender, UdpSender
    from vspan.collectors.model import PortDirectory
    from vspan.errors import ConfigError
    from vspan.inventory import Inventory
    from vspan.sessions import Destination, SessionSet
    from vspan.wire.tunnel import DEFAULT_PORT
    from vspan.yamlconf import parse_address

    cf = CollectorFile.load(args.config) if args.config else None
    analyzer_text = args.analyzer or (None if cf is None else "{}:{}".format(*cf.analyzer))
    if analyzer_text is None:
        raise ConfigError("--analyzer HOST:PORT is needed (or a --config file naming one)")
    if ":" not in analyzer_text:
        analyzer_text = f"{analyzer_text}:{DEFAULT_PORT}"
    address = parse_address(analyzer_text, field="--analyzer")
    try:
        socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot resolve analyzer {address[0]!r}: {exc.strerror}", field="--analyzer"
        ) from None

    def pick(flag: Any, attr: str, default: Any) -> Any:
        """The flag if given, else the config file's value, else the default."""
        if flag is not None:
            return flag
        return getattr(cf, attr) if cf is not None else default

    collector_id = pick(args.collector_id, "collector_id", 1)
    if not 0 < collector_id < 2**32:
        raise ConfigError(f"collector id must be 1..4294967295, got {collector_id}")
    host = args.host_name or (cf.host if cf else args.host or socket.gethostname())
    transport = pick(args.transport, "transport", "udp")
    key = read_key_file(args.key_file) if args.key_file else (cf.key if cf else None)
    snaplen, sample = pick(args.snaplen, "snaplen", 0), pick(args.sample, "sample", 1)
    max_message = pick(args.max_message, "max_message", None)
    sender = (
        UdpSender(address, max_message=max_message or 1400)
        if transport == "udp"
        else TcpSender(address, max_message=max_message or 8900)
    )
    control_url = args.control or (cf.control if cf else None)
    token = args.control_token or os.environ.get(TOKEN_ENV) or (cf.control_token if cf else None)
    if args.control_token and not control_url:
        raise ConfigError("--control-token is given but no --control URL")
    control = ControlClient(control_url, collector_id, token=token) if control_url else None
    sessions = cf.sessions if cf else SessionSet()
    refresh = None
    if args.replay:
        if not args.inventory:
            raise ConfigError("--replay needs --inventory FILE (which MAC is which VM)")
        if args.filter:
            raise ConfigError("--filter applies to live capture, not to --replay")
        inventory = Inventory.load(args.inventory)
        if args.host and inventory.host(args.host) is None:
            raise ConfigError(f"host {args.host!r} is not in {args.inventory}")
        speed = None if args.max_speed else args.speed
        source: Any = ReplaySource(args.replay, inventory, speed=speed, host=args.host)
        directory: Any = source
        settings_snap, settings_sample = snaplen, sample  # the mirror applies them
    else:
        ports: PortDirectory
        if args.bridge:
            ports = BridgeSource([args.bridge], uplinks=tuple(args.uplink) or DEFAULT_UPLINKS)
        else:
            assert cf is not None
            ports = cf.directory()
        state_dir = args.state_dir or (cf.state_dir if cf else default_state_dir())
        discovery = Discovery(ports, VifTable(state_dir))
        refresh, directory = discovery.refresh, discovery
        bpf = args.filter if args.filter is not None else (cf.bpf if cf else "")
        cap_config = AfPacketConfig(
            sample=sample, bpf=bpf or "", **({"snaplen": snaplen} if snaplen else {})
        )
        cap_config.validate()
        source = AfPacketSource(config=cap_config)
        settings_snap, settings_sample = 0, 1  # the capture applies them
    settings = CollectorSettings(
        collector_id=collector_id,
        host=host,
        key=key,
        max_message=max_message,
        snaplen=settings_snap,
        sample=settings_sample,
        analyzer=Destination(address[0], address[1], transport),
    )
    collector = Collector(
        settings,
        source=source,
        directory=directory,
        sender=sender,
        sessions=sessions,
        control=control,
        refresh=refresh,
    )
    stats = args.stats_interval or (cf.stats_interval_s if cf else 10.0)
    return collector, stats


def run(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM (or the end of a replay, or --duration); flush and exit."""
    from vspan.cli.kernels import say
    from vspan.collectors import warmup

    # What the parts log (the control plane unreachable, a TCP connection that cannot be
    # made, and when they work again) goes to stderr beside the stats lines.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="vspan collect: %(levelname)s: %(message)s"
    )
    collector, stats_every = _build(args)
    warmup.warm(say)  # the first run on this machine compiles the kernels, and says so
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    collector.start(start)
    print(
        f"vspan collect: {collector.settings.host} (collector {collector.settings.collector_id}) "
        f"-> {collector.forwarder.sender.addr[0]}:{collector.forwarder.sender.addr[1]}, "
        f"{len(collector.ports)} VM ports",
        file=sys.stderr,
        flush=True,
    )
    next_stats = start + stats_every
    shown, version = "", -1
    try:
        while not stopping:
            now = time.monotonic()
            collector.step(now)
            if collector.selection_version != version:  # say when what is mirrored changes
                version, line = collector.selection_version, collector.sessions_line()
                if line != shown:
                    print(f"vspan collect: {line}", file=sys.stderr, flush=True)
                    shown = line
            if now >= next_stats:
                for line in (collector.stats_line(), *collector.destination_lines()):
                    print(f"vspan collect: {line}", file=sys.stderr, flush=True)
                next_stats = now + stats_every
            if args.duration is not None and now - start >= args.duration:
                break
            if getattr(collector.source, "finished", False) and not collector.routes.pending_frames:
                break
    finally:
        collector.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for line in (collector.stats_line(), *collector.destination_lines()):
            print(f"vspan collect: stopped: {line}", file=sys.stderr, flush=True)
    return 0
