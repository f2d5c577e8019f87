"""The analyzer's settings: defaults, an optional YAML file, and command-line flags.

Every setting can be given in the file and as a flag (flags win). With nothing given the
analyzer listens on loopback only. File format (all keys optional)::

    udp: 127.0.0.1:47470        # tunnel over UDP ("", null or off: off)
    tcp: 127.0.0.1:47470        # tunnel over TCP
    http: 127.0.0.1:8470        # API, dashboard, control plane
    data_dir: /var/lib/vspan
    inventory: inventory.yaml   # static hosts and VMs (collectors also register theirs)
    profiles: profiles.yaml     # port-profiles
    keys: keys.yaml             # collector_id -> hex key (AUTH); see load_keys
    tokens: tokens.yaml         # API bearer token -> read|admin|collector[:ID] (api.auth)
    insecure_listen: false      # serve non-loopback clients without tokens (see below)
    require_known: false        # also accept only registered collectors (see below)
    idle_timeout: 60            # seconds (capture time)
    active_timeout: 300
    max_flows: 1000000
    retention_days: 30
    retention_basis: ingest     # age stored rows by ingest time, or by capture time
    max_store_bytes: 10737418240
    ring_segment_bytes: 67108864
    ring_max_bytes: 2147483648
    ring_max_age: 86400         # seconds
    pair_window: 1.0            # seconds: the two copies of a packet pair within this
    max_pending_copies: 262144  # copies waiting for their partner at most
    udp_rcvbuf: 67108864        # bytes of socket buffer: datagrams wait there while behind
    store_queue_rows: 1000000   # rows queued for the store writer at most (then counted drops)
    ring_queue_bytes: 268435456 # frame bytes queued for the ring's disk at most
    # bounds on hostile input (each rejection or eviction is counted; docs/tunnel.md)
    max_collectors: 4096        # collectors without a key tracked with their own counters
    max_streams: 4096           # (collector, boot_id) sequences tracked
    boot_grace: 60              # seconds a collector's older boots are kept after a restart
    max_macs_per_vif: 1024      # MACs learned from tags behind one vif
    max_learned_macs: 262144    # MACs learned from tags in all
    tcp_max_connections: 512    # TCP tunnel connections at once
    tcp_idle_timeout: 20        # seconds without a whole message before a connection closes
    tcp_max_message: 65535      # largest message a TCP stream may announce

Which collectors are accepted: with ``keys``, only those that have a key (their messages
must be authenticated); with ``require_known``, only those with a key or registered (a host
of the static inventory, or registered through the control plane); with neither, any.
Others are dropped as ``unknown_collector``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

import yaml

from vspan.analysis.store.schema import RETENTION_BASES
from vspan.errors import ConfigError
from vspan.wire.tunnel import DEFAULT_PORT
from vspan.yamlconf import Node, load_file, parse_address

__all__ = ["DEFAULT_HTTP_PORT", "AnalyzerConfig", "load_keys"]

DEFAULT_HTTP_PORT = 8470
_MIN_MESSAGE = 70
"""The smallest message with one frame and a tag (24 + 12 + 18 + 16 bytes)."""
_MAX_TCP_MESSAGE = 16 << 20


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "vspan")


@dataclass(frozen=True, slots=True)
class AnalyzerConfig:
    """Every setting of ``vspan analyze``."""

    udp: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    """Tunnel over UDP, ADDR:PORT; None: off."""
    tcp: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    """Tunnel over TCP, ADDR:PORT; None: off."""
    http: str = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
    """The HTTP API, dashboard and control plane, ADDR:PORT."""
    data_dir: str = ""
    """Store and packet ring; "" means $XDG_DATA_HOME/vspan (~/.local/share/vspan)."""
    inventory: str | None = None
    """Static inventory YAML."""
    profiles: str | None = None
    """Port-profiles YAML."""
    keys: str | None = None
    """Collector keys YAML (``collector_id: hex key``)."""
    tokens: str | None = None
    """API tokens YAML (``token: read|admin|collector[:ID]``); without it only loopback
    clients are served, and ``vspan analyze`` refuses a non-loopback ``http`` address."""
    insecure_listen: bool = False
    """Without ``tokens``: serve every client, loopback or not, without a token (anyone who
    reaches ``http`` reads flows and changes sessions and the inventory). Logged as a
    WARNING at start."""
    require_known: bool = False
    """Accept tunnel messages only from known collectors: with a key, or registered (a host
    of the inventory file or registered through the control plane). ``keys`` alone already
    restricts to the collectors with a key."""
    idle_timeout: float = 60.0
    """Seconds without packets that end a flow (capture time)."""
    active_timeout: float = 300.0
    """Seconds after which a long flow is cut."""
    max_flows: int = 1_000_000
    """Live flows kept; beyond, the least recently seen are finished (counted)."""
    retention_days: float = 30.0
    """Stored rows older than this are deleted (counted and logged)."""
    retention_basis: str = "ingest"
    """What the age of a stored row is counted from: ``ingest`` (when the analyzer stored
    it: a capture replayed from last year is kept ``retention_days`` like live traffic) or
    ``capture`` (the time of its packets)."""
    max_store_bytes: int = 10 << 30
    """The store file is kept under this size (oldest flows deleted first)."""
    ring_segment_bytes: int = 64 << 20
    """Size of one packet-ring pcapng segment."""
    ring_max_bytes: int = 2 << 30
    """Total size of the packet ring."""
    ring_max_age: float = 86_400.0
    """Seconds a packet stays in the ring."""
    pair_window: float = 1.0
    """Seconds (capture time) within which the two copies of a cross-host packet (one per
    host) are paired; ``delay_us`` is measured on paired copies only."""
    max_pending_copies: int = 1 << 18
    """Copies waiting for their partner at most; beyond, a copy is not paired (counted as
    ``pending_overflow``)."""
    udp_rcvbuf: int = 64 << 20
    """Bytes of kernel socket buffer the UDP receiver asks for: where datagrams wait while
    the analyzer is behind (forced beyond net.core.rmem_max when the process may)."""
    store_queue_rows: int = 1_000_000
    """Flows (and other rows) waiting for the store writer at most; beyond, they are
    dropped and counted (``dropped{flows}``)."""
    ring_queue_bytes: int = 256 << 20
    """Frame bytes waiting for the packet ring's disk writes at most; beyond, frames are
    not kept in the ring and counted (``frames_dropped{backpressure}``)."""
    max_collectors: int = 4096
    """Collectors without a key tracked with their own counters (and metrics series); the
    least recently seen beyond are forgotten (counted)."""
    max_streams: int = 4096
    """(collector, boot_id) sequences tracked for loss and duplicates (about 1.3 KB each);
    the least recently seen beyond are forgotten (counted), never a keyed collector's
    current one."""
    boot_grace: float = 60.0
    """Seconds after a collector's restart that its older boot's sequence is kept (late
    messages are still told from replays), then forgotten (counted)."""
    max_macs_per_vif: int = 1024
    """MACs learned from tags behind one (collector, vif); beyond, the least recently seen
    are forgotten (counted)."""
    max_learned_macs: int = 262_144
    """MACs learned from tags in all (24 bytes each); beyond, the least recently seen are
    forgotten (counted)."""
    tcp_max_connections: int = 512
    """TCP tunnel connections at once; more are closed at once (counted). Lowered at start
    to what the fd limit leaves after 128 for the API, store and ring."""
    tcp_idle_timeout: float = 20.0
    """Seconds a TCP tunnel connection may go without completing a message before it is
    closed (counted); trickled bytes do not count. Idle senders reconnect."""
    tcp_max_message: int = 65_535
    """Largest message a TCP tunnel stream may announce (bytes held per connection before
    its tag is checked); a header announcing more closes the stream."""

    def resolved_data_dir(self) -> str:
        """``data_dir`` with its default applied."""
        return self.data_dir or _default_data_dir()

    def merged(self, overrides: dict[str, Any], *, none_means_unset: bool = True) -> AnalyzerConfig:
        """A copy with the given settings replaced. For flags, None means "not given"; a
        file's explicit null (``tcp: null``: off) is kept with ``none_means_unset=False``."""
        given = {k: v for k, v in overrides.items() if v is not None or not none_means_unset}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        out = replace(self, **given)
        out.validate()
        return out

    def validate(self) -> None:
        """Check addresses and limits; raise ``ConfigError`` naming the setting."""
        for name in ("udp", "tcp", "http"):
            value = getattr(self, name)
            if value:
                parse_address(value, field=name)
        for name in (
            "idle_timeout",
            "active_timeout",
            "max_flows",
            "retention_days",
            "max_store_bytes",
            "ring_segment_bytes",
            "ring_max_bytes",
            "ring_max_age",
            "pair_window",
            "max_pending_copies",
            "udp_rcvbuf",
            "store_queue_rows",
            "ring_queue_bytes",
            "max_collectors",
            "max_streams",
            "max_macs_per_vif",
            "max_learned_macs",
            "tcp_max_connections",
            "tcp_idle_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, got {getattr(self, name)}", field=name)
        if self.boot_grace < 0:
            raise ConfigError(f"must not be negative, got {self.boot_grace}", field="boot_grace")
        if not _MIN_MESSAGE <= self.tcp_max_message <= _MAX_TCP_MESSAGE:
            raise ConfigError(
                f"expected {_MIN_MESSAGE}..{_MAX_TCP_MESSAGE} bytes, got {self.tcp_max_message}",
                field="tcp_max_message",
            )
        if self.retention_basis not in RETENTION_BASES:
            expected = " or ".join(RETENTION_BASES)
            raise ConfigError(
                f"expected {expected}, got {self.retention_basis!r}", field="retention_basis"
            )

    @classmethod
    def load(cls, path: str) -> AnalyzerConfig:
        """Settings from a YAML file over the defaults; errors name the line and field."""
        root = load_file(path)
        if root.value is None:
            return cls()
        known = {f.name: f for f in fields(cls)}
        root.check_keys(set(known))
        values: dict[str, Any] = {}
        for key in root.keys():  # noqa: SIM118 - Node.keys(), not a dict
            node = root.get(key)
            values[key] = _typed(node, str(known[key].type))
        try:
            return cls().merged(values, none_means_unset=False)
        except ConfigError as exc:
            field = exc.field or ""
            raise (
                root.get(field).error(str(exc).split(": ", 1)[-1]) if field in values else exc
            ) from None


def _typed(node: Node, annotation: str) -> Any:
    """The node's value checked against the setting's type."""
    value = node.value
    if value is None and "None" in annotation:
        return None
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise node.error(f"expected true or false, got {value!r}")
        return value
    if annotation.startswith("int"):
        return node.as_int(1, 2**63 - 1)
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise node.error(f"expected a number, got {value!r}")
        return float(value)
    if value == "" or (value is False and "None" in annotation):
        return None if "None" in annotation else ""  # YAML reads ``off`` as false
    return node.as_str()


def load_keys(path: str) -> dict[int, bytes]:
    """Collector keys: a YAML mapping ``collector_id: hex`` (16–64 bytes of key)."""
    root = load_file(path)
    if not isinstance(root.value, dict):
        raise root.error("expected a mapping of collector_id to hex key")
    keys: dict[int, bytes] = {}
    for node_key in root.keys():  # noqa: SIM118 - Node.keys(), not a dict
        node = root.get(node_key)
        try:
            cid = int(node_key)
        except ValueError:
            raise node.error(f"collector_id {node_key!r} is not a number") from None
        if not 0 < cid < 2**32:
            raise node.error(f"collector_id {cid} out of range 1..4294967295")
        # The scalar's own text: YAML would read an all-digit key such as 0001... as a number.
        text = str(node.yaml_node.value) if isinstance(node.yaml_node, yaml.ScalarNode) else ""
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise node.error("expected the key as hex digits") from None
        if not 16 <= len(key) <= 64:
            raise node.error(f"a key has 16..64 bytes, got {len(key)}")
        keys[cid] = key
    return keys
