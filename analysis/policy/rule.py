"""ACL rules of port-profiles: the model, and the names its fields take.

A ``Rule`` is written in absolute terms: its source is the side that opened the flow, its
destination the side that answered. Every field it sets must match for the rule to match;
an address is ``any``, a prefix (a host is a /32 or /128), ``vm:NAME`` or ``profile:NAME``.
The name tables map the keywords of the NX-OS grammar (protocols, named ports, ICMP types)
to numbers. Reading and writing rules — the one-line grammar and the field parsers of the
mapping form — is ``policy/acl.py``'s, which re-exports everything here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = [
    "ANY",
    "ICMP_TYPES",
    "PORT_NAMES",
    "PROTOCOLS",
    "Action",
    "Address",
    "AnyAddress",
    "Network",
    "PortMatch",
    "PortOp",
    "Prefix",
    "ProfileRef",
    "Rule",
    "VmRef",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(StrEnum):
    """What a rule (or a profile's default) does with the flows it matches."""

    PERMIT = "permit"
    DENY = "deny"


class PortOp(StrEnum):
    """Port operators of the NX-OS grammar."""

    EQ = "eq"
    NEQ = "neq"
    LT = "lt"
    GT = "gt"
    RANGE = "range"


@dataclass(frozen=True, slots=True)
class PortMatch:
    """One port test."""

    op: PortOp
    """The operator."""
    port: int
    """The port of ``eq``/``neq``/``lt``/``gt``; the low end of a ``range``."""
    high: int | None = None
    """The high end of a ``range`` (inclusive); None for the other operators."""


@dataclass(frozen=True, slots=True)
class AnyAddress:
    """``any``: every endpoint."""


@dataclass(frozen=True, slots=True)
class Prefix:
    """An IPv4 or IPv6 prefix; a host address is a /32 or /128."""

    network: Network
    """The prefix, host bits clear."""


@dataclass(frozen=True, slots=True)
class VmRef:
    """``vm:NAME``: the endpoint is a VM whose name or UUID matches (fnmatch, case-sensitive)."""

    pattern: str
    """A VM name, a UUID or a pattern like ``web-*``."""


@dataclass(frozen=True, slots=True)
class ProfileRef:
    """``profile:NAME``: the endpoint is a VM bound to that port-profile."""

    name: str
    """A profile defined in the same file."""


Address = AnyAddress | Prefix | VmRef | ProfileRef
ANY: Final = AnyAddress()


@dataclass(frozen=True, slots=True)
class Rule:
    """One ACL entry; every field must match for the rule to match a flow."""

    action: Action
    """Permit or deny."""
    protocol: int | None
    """IP protocol number; None for ``ip`` (every IP flow)."""
    source: Address = ANY
    """The flow's initiator (the side that sent its first packet)."""
    destination: Address = ANY
    """The flow's responder."""
    source_ports: tuple[PortMatch, ...] = ()
    """Tests of the source port, any of which must hold; empty for any port."""
    ports: tuple[PortMatch, ...] = ()
    """Tests of the destination port, any of which must hold; empty for any port."""
    icmp_type: int | None = None
    """ICMP/ICMPv6 type; None for any."""
    icmp_code: int | None = None
    """ICMP/ICMPv6 code; None for any."""
    sequence: int | None = None
    """The NX-OS sequence number, when the one-line form has one (order is list order)."""
    name: str | None = None
    """Optional name (mapping form), shown beside hit counters."""
    remark: str | None = None
    """Optional free text (mapping form)."""


PROTOCOLS: Final[dict[str, int | None]] = {
    "ip": None, "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ahp": 51,
    "icmpv6": 58, "eigrp": 88, "ospf": 89, "pim": 103, "sctp": 132,
}  # fmt: skip
"""Protocol keywords (NX-OS names) → numbers."""

PORT_NAMES: Final[dict[str, int]] = {
    "ftp-data": 20, "ftp": 21, "telnet": 23, "smtp": 25, "domain": 53, "bootps": 67,
    "bootpc": 68, "tftp": 69, "www": 80, "pop3": 110, "ntp": 123, "snmp": 161, "snmptrap": 162,
    "bgp": 179, "syslog": 514,
}  # fmt: skip
"""Named ports accepted after a port operator (a subset of NX-OS's)."""

ICMP_TYPES: Final[dict[int, dict[str, tuple[int, int | None]]]] = {
    1: {
        "echo-reply": (0, None), "unreachable": (3, None), "net-unreachable": (3, 0),
        "host-unreachable": (3, 1), "protocol-unreachable": (3, 2), "port-unreachable": (3, 3),
        "packet-too-big": (3, 4), "source-quench": (4, None), "redirect": (5, None),
        "echo": (8, None), "router-advertisement": (9, None), "router-solicitation": (10, None),
        "time-exceeded": (11, None), "ttl-exceeded": (11, 0), "parameter-problem": (12, None),
        "timestamp-request": (13, None), "timestamp-reply": (14, None),
    },
    58: {
        "unreachable": (1, None), "packet-too-big": (2, None), "time-exceeded": (3, None),
        "parameter-problem": (4, None), "echo": (128, None), "echo-reply": (129, None),
        "router-solicitation": (133, None), "router-advertisement": (134, None),
        "nd-ns": (135, None), "nd-na": (136, None), "redirect": (137, None),
    },
}  # fmt: skip
"""ICMP (protocol 1) and ICMPv6 (58) type names → (type, code or None for any code)."""
