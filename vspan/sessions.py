"""SPAN sessions: which VMs' traffic to mirror, which way, which frames, how much, where to.

A session selects VMs, not ports: ``vms`` entries match a VM's name or UUID exactly, or
its name as an ``fnmatch`` pattern; ``profiles`` match its port-profile (patterns too).
``routes(ports)`` is re-run on the current ports whenever discovery reports a change, so a
VM that appears on a new port (a live migration to this host, a reboot) is mirrored at
once. Collector config (YAML, ``sessions:``), or the same fields as JSON from the
analyzer's control plane (a list or ``{"sessions": [...]}``, as text or decoded)::

    sessions:
      - name: web-debug
        vms: [web-01, "db-*", 6f1c2d9e-0000-4000-8000-000000000001]
        profiles: [pci]
        direction: both           # rx | tx | both (default both)
        filter: "tcp port 443"    # a libpcap expression (optional)
        snaplen: 128              # bytes of each frame to keep; 0 = all (default)
        sample: 10                # keep 1 frame in 10 per port (default 1)
        destination: "udp://10.0.0.5:47470"   # analyzer; udp:// or tcp://, port default 47470

What the fields do:

- While at least one session exists (in the collector's config, or on the analyzer), a
  collector mirrors only what its sessions select: a host with no selected VM sends nothing
  (it still registers and heartbeats). With no session anywhere every VM is mirrored.
- ``filter`` is a libpcap (tcpdump) expression, applied to the untagged frame as the VM port
  saw it (an 802.1Q tag the kernel took off put back). libpcap compiles it when the session
  is loaded — a bad one is a ``ConfigError`` naming the line and field, a 422 on the API —
  and ``vspan.bpf`` runs it over each batch where the frame is mirrored.
- ``destination`` sends the session's frames to that analyzer instead of the collector's
  own, like a Nexus 1000V ERSPAN session: only there. The collector's analyzer gets the
  frames of sessions without a destination. A frame that sessions with different
  destinations select goes to each of them. Every destination has a forwarder of its own:
  its own ``boot_id`` and ``seq`` (so no analyzer sees the others' messages as gaps), its
  own counters, the collector's ``collector_id`` and AUTH key.

Sessions of one destination merge per port: rx and tx are or-ed, ``both`` is set when one
session asks for both directions of the port's VM, the snaplen is the largest (0 wins),
the sampling the densest (smallest N). Sessions with different filters stay apart (one
``Selection`` each, with its filter); a frame is wanted when any of them wants it.
"""

from __future__ import annotations

import enum
import json
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Final
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from vspan.bpf import PacketFilter
from vspan.errors import ConfigError
from vspan.inventory import MAX_VIF, Port
from vspan.wire.tunnel import DEFAULT_PORT
from vspan.yamlconf import Node, load

__all__ = [
    "MIN_SNAPLEN",
    "Destination",
    "Direction",
    "PortSelection",
    "Selection",
    "Session",
    "SessionSet",
]

MIN_SNAPLEN: Final = 14
"""A snaplen below the Ethernet header would leave nothing to tag."""
_FIELDS: Final = {
    "name",
    "vms",
    "profiles",
    "direction",
    "filter",
    "snaplen",
    "sample",
    "destination",
}


class Direction(enum.Enum):
    """Which frames of a selected VM a session wants."""

    RX = "rx"
    TX = "tx"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a session's frames go (an analyzer's tunnel receiver)."""

    host: str
    """Address or name of the analyzer."""
    port: int = DEFAULT_PORT
    """Tunnel port."""
    transport: str = "udp"
    """``udp`` or ``tcp``."""

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``host``, ``host:port``, ``[v6]:port``, with an optional ``udp://``/``tcp://``."""
        url = urlsplit(text if "://" in text else f"udp://{text}")
        if url.scheme not in ("udp", "tcp"):
            raise ValueError(f"transport {url.scheme!r}, expected udp or tcp")
        if not url.hostname or url.path or url.query:
            raise ValueError(f"expected [udp|tcp://]host[:port], got {text!r}")
        return cls(url.hostname, url.port or DEFAULT_PORT, url.scheme)

    @property
    def url(self) -> str:
        """``udp://host:port`` (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Session:
    """One SPAN session, validated."""

    name: str
    """Unique name of the session."""
    vms: tuple[str, ...] = ()
    """VM names, UUIDs or name patterns."""
    profiles: tuple[str, ...] = ()
    """Port-profile names or patterns."""
    direction: Direction = Direction.BOTH
    """Frames the selected VMs receive (rx), send (tx), or both."""
    filter: str | None = None
    """A libpcap expression the frames must match (checked when the session is loaded)."""
    snaplen: int = 0
    """Bytes of each original frame to keep; 0 keeps all."""
    sample: int = 1
    """Keep one frame in ``sample`` per port (deterministic: the 1st, N+1th, ...)."""
    destination: Destination | None = None
    """Analyzer to send to; None means the collector's default."""

    def matches(self, port: Port) -> bool:
        """Whether the VM behind ``port`` is selected."""
        uid = port.vm_uuid.lower() if port.vm_uuid else None
        for item in self.vms:
            if item == port.vm_name or item.lower() == uid or fnmatchcase(port.vm_name, item):
                return True
        return port.profile is not None and any(fnmatchcase(port.profile, p) for p in self.profiles)


@dataclass(frozen=True, slots=True)
class PortSelection:
    """What the sessions want of one port (for the capture layer and for tests)."""

    rx: bool
    """Frames delivered to the VM are wanted."""
    tx: bool
    """Frames the VM sends are wanted."""
    both: bool
    """A session wants both directions of this VM (intra-host deliveries are exported)."""
    snaplen: int
    """Bytes of each frame to keep; 0 keeps all."""
    sample: int
    """Keep 1 frame in ``sample``."""
    filters: tuple[str, ...] = ()
    """The filter of the sessions selecting the port (none: every frame)."""
    sessions: tuple[str, ...] = ()
    """Names of the sessions selecting the port."""


@dataclass(frozen=True, slots=True, eq=False)
class Selection:
    """Per-vif columns (index = vif, 0..4095) that ``mirror`` applies as masks: what the
    sessions sharing one filter want."""

    rx: npt.NDArray[np.bool_]
    """Frames delivered to this vif's VM are wanted."""
    tx: npt.NDArray[np.bool_]
    """Frames this vif's VM sends are wanted."""
    both: npt.NDArray[np.bool_]
    """A session asks for both directions of this vif's VM."""
    snaplen: npt.NDArray[np.int32]
    """Bytes to keep; 0 keeps all."""
    sample: npt.NDArray[np.int32]
    """1:N sampling; 1 keeps all."""
    per_port: dict[str, PortSelection] = field(default_factory=dict)
    """The same, by port name, for the selected ports only."""
    filter: PacketFilter | None = None
    """What a wanted frame must also match; None: every frame."""

    @classmethod
    def everything(cls) -> Selection:
        """Mirror all traffic once: rx and tx everywhere, no session asking for both."""
        on = np.ones(MAX_VIF + 1, dtype=np.bool_)
        return cls(
            rx=on,
            tx=on.copy(),
            both=np.zeros(MAX_VIF + 1, np.bool_),
            snaplen=np.zeros(MAX_VIF + 1, np.int32),
            sample=np.ones(MAX_VIF + 1, np.int32),
        )


class SessionSet:
    """Validated sessions, and the selection they make of a set of ports."""

    def __init__(self, sessions: Sequence[Session] = ()) -> None:
        self.sessions: tuple[Session, ...] = tuple(sessions)

    def destinations(self) -> list[Destination | None]:
        """Distinct destinations, in first-use order (one forwarder each)."""
        return list(dict.fromkeys(s.destination for s in self.sessions))

    def for_destination(self, destination: Destination | None) -> SessionSet:
        """The sessions that send to ``destination`` (None: the collector's default)."""
        return SessionSet([s for s in self.sessions if s.destination == destination])

    def merged(self, pushed: SessionSet) -> SessionSet:
        """These sessions (the collector's config) and ``pushed`` ones (the control
        plane's); a pushed session replaces a local one of the same name."""
        names = {s.name for s in pushed.sessions}
        return SessionSet([*(s for s in self.sessions if s.name not in names), *pushed.sessions])

    def routes(self, ports: Sequence[Port]) -> dict[Destination | None, tuple[Selection, ...]]:
        """Per destination, what its sessions want of ``ports`` (``selections``)."""
        return {d: self.for_destination(d).selections(ports) for d in self.destinations()}

    def selections(self, ports: Sequence[Port]) -> tuple[Selection, ...]:
        """What the sessions want of ``ports``: one ``Selection`` per distinct filter (the
        sessions without one together), in first-use order, those selecting no port left
        out. ``()``: nothing is wanted."""
        out = []
        for text in dict.fromkeys(s.filter for s in self.sessions):
            group = [s for s in self.sessions if s.filter == text]
            sel = _merge(group, ports, None if text is None else PacketFilter.compile(text))
            if sel.per_port:
                out.append(sel)
        return tuple(out)

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def from_node(cls, node: Node) -> SessionSet:
        """Sessions from a list node; errors name the file, line and field."""
        sessions: list[Session] = []
        names: set[str] = set()
        for item in node.items():
            session = _parse_session(item)
            if session.name in names:
                raise item.get("name").error(f"duplicate session name {session.name!r}")
            names.add(session.name)
            sessions.append(session)
        return cls(sessions)

    @classmethod
    def from_config(cls, root: Node) -> SessionSet:
        """The ``sessions:`` list of a collector config (none when absent or empty)."""
        if not root.has("sessions") or root.get("sessions").value is None:
            return cls()
        return cls.from_node(root.get("sessions"))

    @classmethod
    def loads_yaml(cls, text: str, path: str = "<collector config>") -> SessionSet:
        """Sessions from collector config YAML text."""
        return cls.from_config(load(text, path))

    @classmethod
    def loads_json(cls, text: str | bytes, origin: str = "<control plane>") -> SessionSet:
        """Sessions from the control plane's JSON (a list or ``{"sessions": [...]}``)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        try:
            doc = json.loads(text)
        except ValueError as exc:
            line = getattr(exc, "lineno", None)
            raise ConfigError(f"JSON syntax: {exc}", path=origin, line=line) from exc
        root = load(text, origin)  # JSON is YAML: the same nodes, with lines, for errors
        if isinstance(doc, list):
            return cls.from_node(root)
        if not isinstance(doc, dict):
            raise root.error(f"expected a list or an object, got {type(doc).__name__}")
        root.check_keys({"sessions"})
        return cls.from_config(root)

    @classmethod
    def from_json_value(cls, value: object, origin: str = "<control plane>") -> SessionSet:
        """Sessions from JSON already decoded (e.g. by the control-plane client).

        Error lines then refer to the value re-encoded with one key per line.
        """
        try:
            text = json.dumps(value, indent=1)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"not a JSON value: {exc}", path=origin) from exc
        return cls.loads_json(text, origin)


def _merge(sessions: Sequence[Session], ports: Sequence[Port], filt: PacketFilter | None
           ) -> Selection:  # fmt: skip
    """The sessions (sharing ``filt``) merged over ``ports``: what to mirror of each vif."""
    rx, tx, both = (np.zeros(MAX_VIF + 1, np.bool_) for _ in range(3))
    snaplen = np.zeros(MAX_VIF + 1, np.int32)
    sample = np.ones(MAX_VIF + 1, np.int32)
    per_port: dict[str, PortSelection] = {}
    for port in ports:
        hits = [s for s in sessions if s.matches(port)]
        if not hits or not 1 <= port.vif <= MAX_VIF:
            continue
        directions = {s.direction for s in hits}
        snaps = [s.snaplen for s in hits]
        sel = PortSelection(
            rx=bool(directions & {Direction.RX, Direction.BOTH}),
            tx=bool(directions & {Direction.TX, Direction.BOTH}),
            both=Direction.BOTH in directions,
            snaplen=0 if 0 in snaps else max(snaps),
            sample=min(s.sample for s in hits),
            filters=() if filt is None else (filt.expression,),
            sessions=tuple(s.name for s in hits),
        )
        per_port[port.name] = sel
        v = port.vif
        rx[v], tx[v], both[v] = sel.rx, sel.tx, sel.both
        snaplen[v], sample[v] = sel.snaplen, sel.sample
    return Selection(rx, tx, both, snaplen, sample, per_port, filt)


def _strings(node: Node, key: str) -> tuple[str, ...]:
    if not node.has(key):
        return ()
    return tuple(item.as_str() for item in node.get(key).items())


def _parse_session(node: Node) -> Session:
    node.check_keys(_FIELDS)
    name = node.get("name").as_str()
    vms = tuple(_normal_uuid(v) for v in _strings(node, "vms"))
    profiles = _strings(node, "profiles")
    if not vms and not profiles:
        raise node.error(f"session {name!r} selects nothing: give 'vms' or 'profiles'")
    direction = Direction.BOTH
    if node.has("direction"):
        text = node.get("direction").as_str()
        try:
            direction = Direction(text)
        except ValueError:
            raise node.get("direction").error(
                f"unknown direction {text!r}; expected one of both, rx, tx"
            ) from None
    snaplen = node.get("snaplen").as_int(0, 0xFFFF) if node.has("snaplen") else 0
    if 0 < snaplen < MIN_SNAPLEN:
        raise node.get("snaplen").error(f"snaplen {snaplen} below {MIN_SNAPLEN}; 0 keeps all")
    filt = None
    if node.has("filter") and node.get("filter").value is not None:
        filt = node.get("filter").as_str().strip() or None  # "" is no filter
        try:
            if filt is not None:  # compiled once: the mirror takes it from the cache
                PacketFilter.compile(filt)
        except ConfigError as exc:
            raise node.get("filter").error(str(exc).removeprefix("bpf: ")) from None
    destination = None
    if node.has("destination") and node.get("destination").value is not None:
        dest = node.get("destination")
        try:
            destination = Destination.parse(dest.as_str())
        except ValueError as exc:
            raise dest.error(str(exc)) from None
    return Session(
        name=name,
        vms=vms,
        profiles=profiles,
        direction=direction,
        filter=filt,
        snaplen=snaplen,
        sample=node.get("sample").as_int(1, 1 << 30) if node.has("sample") else 1,
        destination=destination,
    )


def _normal_uuid(text: str) -> str:
    """A UUID in canonical lower-case form, any other text unchanged."""
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return text
