"""The collector's configuration file (``vspan collect --config host.yaml``).

::

    collector_id: 1                  # this host's id in the tunnel (required)
    host: hv01                       # this host's name (default: the hostname)
    analyzer: 10.0.0.10:47470        # where tunnel messages go (required)
    transport: udp                   # udp (default) or tcp
    key_file: /etc/vspan/hv01.key    # hex AUTH key shared with the analyzer (optional)
    max_message: 1400                # bytes per message: 1400 fits a 1,500-byte path
    control: http://10.0.0.10:8470   # the analyzer's control plane (optional)
    control_token: c-0123456789abcdef   # its bearer token (collector:ID role; optional)
    state_dir: /var/lib/vspan        # keeps the vif assignment across restarts
    snaplen: 0                       # bytes kept per frame, 0: all
    sample: 1                        # 1:N sampling per port
    filter: ""                       # libpcap filter run in the kernel, on every port
    stats_interval: 10               # seconds between stats lines
    discovery:                       # where the VM ports come from
      kind: bridge                   # static | libvirt | ovs | bridge
      bridges: [br0]
      uplinks: [eth*]
    sessions:                        # SPAN sessions (vspan/sessions.py); while any exists,
      - name: web                    # here or on the analyzer, only selected VMs are mirrored
        vms: ["web-*"]
        direction: both
        filter: "tcp port 443"       # libpcap expression (optional)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from vspan.collectors.model import PortDirectory
from vspan.errors import ConfigError
from vspan.sessions import SessionSet
from vspan.yamlconf import Node, load_file, parse_address

__all__ = ["CollectorFile", "default_state_dir", "read_key_file"]

_KEYS = {
    "collector_id",
    "host",
    "analyzer",
    "transport",
    "key_file",
    "max_message",
    "control",
    "control_token",
    "state_dir",
    "snaplen",
    "sample",
    "filter",
    "stats_interval",
    "discovery",
    "sessions",
}


def default_state_dir() -> str:
    """Where the vif table lives unless told otherwise."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "vspan-collector")


def read_key_file(path: str) -> bytes:
    """An AUTH key: hex digits (16–64 bytes), surrounding white space ignored."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the key: {exc}", path=path) from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("expected the key as hex digits", path=path, line=1) from None
    if not 16 <= len(key) <= 64:
        raise ConfigError(f"a key has 16..64 bytes, got {len(key)}", path=path, line=1)
    return key


@dataclass(frozen=True, slots=True)
class CollectorFile:
    """A validated collector configuration."""

    collector_id: int
    host: str
    analyzer: tuple[str, int]
    transport: str
    key: bytes | None
    max_message: int | None
    control: str | None
    control_token: str | None
    """Bearer token for the control plane (the analyzer's ``collector:ID`` token)."""
    state_dir: str
    snaplen: int
    sample: int
    bpf: str
    stats_interval_s: float
    discovery: Node | None
    """The ``discovery:`` section (built into a source by ``discovery.source_from_config``)."""
    sessions: SessionSet

    @classmethod
    def load(cls, path: str) -> CollectorFile:
        """Read and validate ``path``; errors name the line and field."""
        root = load_file(path)
        root.check_keys(_KEYS)
        analyzer = root.get("analyzer")
        try:
            address = parse_address(analyzer.as_str(), field="analyzer")
        except ConfigError as exc:
            raise analyzer.error(str(exc).split(": ", 1)[-1]) from None
        transport = root.get("transport").as_str() if root.has("transport") else "udp"
        if transport not in ("udp", "tcp"):
            raise root.get("transport").error(f"expected udp or tcp, got {transport!r}")
        key = None
        if root.has("key_file"):
            key_path = root.get("key_file").as_str()
            base = os.path.dirname(os.path.abspath(path))
            key = read_key_file(os.path.join(base, key_path))

        def number(name: str, lo: int, hi: int, default: int) -> int:
            return root.get(name).as_int(lo, hi) if root.has(name) else default

        stats = root.get("stats_interval").value if root.has("stats_interval") else 10
        if isinstance(stats, bool) or not isinstance(stats, int | float) or stats <= 0:
            raise root.get("stats_interval").error(f"expected a positive number, got {stats!r}")
        return cls(
            collector_id=root.get("collector_id").as_int(1, 2**32 - 1),
            host=root.get("host").as_str() if root.has("host") else socket.gethostname(),
            analyzer=address,
            transport=transport,
            key=key,
            max_message=number("max_message", 54, 65507, 0) or None,
            control=root.get("control").as_str() if root.has("control") else None,
            control_token=root.get("control_token").as_str() if root.has("control_token") else None,
            state_dir=root.get("state_dir").as_str()
            if root.has("state_dir")
            else default_state_dir(),
            snaplen=number("snaplen", 0, 65535, 0),
            sample=number("sample", 1, 1 << 30, 1),
            bpf=root.get("filter").value or "" if root.has("filter") else "",
            stats_interval_s=float(stats),
            discovery=root.get("discovery") if root.has("discovery") else None,
            sessions=SessionSet.from_config(root),
        )

    def directory(self) -> PortDirectory:
        """The port source the ``discovery:`` section names (a ``ConfigError`` if none)."""
        from vspan.collectors.discovery.ports import source_from_config

        if self.discovery is None:
            raise ConfigError("missing 'discovery' section: where do the VM ports come from?")
        return source_from_config(self.discovery)
