"""ACL rules of port-profiles: the NX-OS-like one-line grammar, and its inverse.

A rule is written in absolute terms — the source is the side that opened the flow::

    [SEQ] permit|deny PROTOCOL SOURCE [PORTS...] DESTINATION [PORTS...] [ICMP-TYPE [CODE]]

    PROTOCOL  ip | tcp | udp | icmp | icmpv6 | sctp | … | 0..255
    address   any | host ADDR | PREFIX/LEN | ADDR WILDCARD (IPv4, contiguous) | ADDR
              | vm:NAME-UUID-OR-PATTERN | profile:NAME
    PORTS     eq P | neq P | lt P | gt P | range P P     (tcp, udp and sctp only)
    ICMP-TYPE a name (echo, echo-reply, unreachable, time-exceeded, …) or 0..255

As on NX-OS, port operators follow the address they qualify. vspan extensions: ``vm:`` and
``profile:`` addresses; several port operators in a row (the rule matches when any does);
a bare address is a host. Sans-I/O: ``parse_rule`` takes text and returns a ``Rule``,
``format_rule`` is its inverse; the ``parse_*`` field parsers serve the mapping form, which
``policy/profiles.py`` reads from YAML. Every error is a ``PolicyError`` naming the offending token
(the loader adds the file, line, profile and rule).

The model (``Rule``, its addresses and port matches) and the keyword tables live in
``policy/rule.py``; they are re-exported here, so this module is the one import for rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Final, TypeVar

from vspan.analysis.policy.rule import (
    ANY,
    ICMP_TYPES,
    PORT_NAMES,
    PROTOCOLS,
    Action,
    Address,
    AnyAddress,
    Network,
    PortMatch,
    PortOp,
    Prefix,
    ProfileRef,
    Rule,
    VmRef,
)
from vspan.errors import PolicyError

__all__ = [
    "ANY",
    "ICMP_TYPES",
    "PORT_NAMES",
    "PROTOCOLS",
    "Action",
    "Address",
    "AnyAddress",
    "PortMatch",
    "PortOp",
    "Prefix",
    "ProfileRef",
    "Rule",
    "VmRef",
    "check_rule",
    "format_rule",
    "parse_address",
    "parse_icmp",
    "parse_ports",
    "parse_protocol",
    "parse_rule",
]

T = TypeVar("T")

_PROTOCOL_NAMES: Final = {n: k for k, n in PROTOCOLS.items() if n is not None}
_PORT_PROTOCOLS: Final = frozenset({6, 17, 132})
_PORT_OPS: Final = frozenset(op.value for op in PortOp)
_ACTIONS: Final = frozenset(a.value for a in Action)
_ICMP_NAMES: Final = {p: {v: k for k, v in names.items()} for p, names in ICMP_TYPES.items()}
assert all(len(_ICMP_NAMES[p]) == len(ICMP_TYPES[p]) for p in ICMP_TYPES), "ambiguous names"


class _Tokens:
    """A cursor over the words of a rule; errors name the token (or what is missing)."""

    def __init__(self, text: str) -> None:
        self.words = text.split()
        self.pos = 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self, what: str) -> str:
        word = self.peek()
        if word is None:
            after = f"after {self.words[-1]!r}" if self.words else "empty rule"
            raise PolicyError(f"{after}: expected {what}")
        self.pos += 1
        return word


def _is_number(word: str) -> bool:
    return word.isascii() and word.isdigit()  # "²".isdigit() holds, but int("²") fails


def _number(word: str, what: str, hi: int) -> int:
    if not _is_number(word):
        raise PolicyError(f"bad {what} {word!r}")
    value = int(word)
    if value > hi:
        raise PolicyError(f"{what} {value} out of range 0..{hi}")
    return value


def parse_protocol(word: str) -> int | None:
    """A protocol keyword or number; None for ``ip``."""
    if word in PROTOCOLS:
        return PROTOCOLS[word]
    if _is_number(word):
        return _number(word, "protocol", 255)
    raise PolicyError(f"unknown protocol {word!r}")


def _network(text: str) -> Network:
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise PolicyError(f"bad prefix {text!r}") from None
    if ipaddress.ip_address(text.partition("/")[0]) != loose.network_address:
        raise PolicyError(f"bad prefix {text!r}: host bits set; did you mean {loose}?")
    return loose


def _host(word: str) -> Prefix:
    try:
        return Prefix(ipaddress.ip_network(ipaddress.ip_address(word)))
    except ValueError:
        raise PolicyError(f"bad address {word!r}") from None


def _wildcard(addr: str, mask: str) -> Prefix:
    inverse = ~int(ipaddress.IPv4Address(mask)) & 0xFFFF_FFFF
    bits = inverse.bit_count()
    if inverse != (0xFFFF_FFFF << (32 - bits)) & 0xFFFF_FFFF:
        raise PolicyError(f"wildcard mask {mask!r} is not contiguous; write a prefix")
    return Prefix(_network(f"{addr}/{bits}"))


def _is_ipv4(word: str | None) -> bool:
    try:
        ipaddress.IPv4Address(word or "")
    except ValueError:
        return False
    return True


def _reference(word: str, kind: str) -> str:
    name = word.partition(":")[2]
    if not name:
        raise PolicyError(f"{kind}: needs a name, got {word!r}")
    return name


def _address(tokens: _Tokens, what: str) -> Address:
    word = tokens.take(what)
    if word == "any":
        return ANY
    if word == "host":
        return _host(tokens.take("an address after 'host'"))
    if word.startswith("vm:"):
        return VmRef(_reference(word, "vm"))
    if word.startswith("profile:"):
        return ProfileRef(_reference(word, "profile"))
    if "/" in word:
        return Prefix(_network(word))
    if _is_ipv4(word) and _is_ipv4(tokens.peek()):
        return _wildcard(word, tokens.take("a wildcard mask"))
    if not _is_ipv4(word) and ":" not in word:
        raise PolicyError(f"bad address {word!r}")
    return _host(word)


def _port(word: str) -> int:
    return PORT_NAMES[word] if word in PORT_NAMES else _number(word, "port", 65535)


def _port_matches(tokens: _Tokens, protocol: int | None) -> tuple[PortMatch, ...]:
    out: list[PortMatch] = []
    while (word := tokens.peek()) in _PORT_OPS:
        tokens.take("a port operator")
        if protocol not in _PORT_PROTOCOLS:
            proto = "ip" if protocol is None else _PROTOCOL_NAMES.get(protocol, str(protocol))
            raise PolicyError(
                f"port operator {word!r} needs protocol tcp, udp or sctp, not {proto}"
            )
        op = PortOp(word)
        port = _port(tokens.take(f"a port after {word!r}"))
        high = _port(tokens.take("the high port of 'range'")) if op is PortOp.RANGE else None
        if high is not None and high < port:
            raise PolicyError(f"port range out of order: {port} > {high}")
        if (op, port) in ((PortOp.LT, 0), (PortOp.GT, 65535)):
            raise PolicyError(f"'{op} {port}' matches no port")
        out.append(PortMatch(op, port, high))
    return tuple(out)


def _icmp(tokens: _Tokens, protocol: int) -> tuple[int | None, int | None]:
    word = tokens.peek()
    if word is None:
        return None, None
    tokens.take("an ICMP type")
    if word in ICMP_TYPES[protocol]:
        return ICMP_TYPES[protocol][word]
    if not _is_number(word):
        raise PolicyError(f"unknown ICMP type {word!r}")
    code = tokens.peek()
    return _number(word, "ICMP type", 255), None if code is None else _icmp_code(tokens)


def _icmp_code(tokens: _Tokens) -> int:
    return _number(tokens.take("an ICMP code"), "ICMP code", 255)


def check_rule(rule: Rule) -> Rule:
    """Reject rules that can never match a flow."""
    nets = {
        side: addr.network
        for side, addr in (("source", rule.source), ("destination", rule.destination))
        if isinstance(addr, Prefix)
    }
    if len({n.version for n in nets.values()}) > 1:
        raise PolicyError(
            f"source {nets['source']} and destination {nets['destination']} are of different"
            " IP families; the rule can never match"
        )
    wrong = {1: 6, 58: 4}.get(rule.protocol or 0)
    for side, net in nets.items():
        if net.version == wrong:
            name = _PROTOCOL_NAMES[rule.protocol or 0]
            raise PolicyError(f"protocol {name} never carries IPv{wrong} {side} {net}")
    return rule


def parse_rule(text: str) -> Rule:
    """A rule from its one-line form (see the module docstring)."""
    tokens = _Tokens(text)
    first = tokens.take("'permit' or 'deny'")
    sequence = _number(first, "sequence number", 2**32 - 1) if _is_number(first) else None
    word = tokens.take("'permit' or 'deny'") if sequence is not None else first
    if word not in _ACTIONS:
        hint = "; a remark goes in a rule's 'remark' field" if word == "remark" else ""
        raise PolicyError(f"expected 'permit' or 'deny', got {word!r}{hint}")
    protocol = parse_protocol(tokens.take("a protocol"))
    source = _address(tokens, "a source address")
    source_ports = _port_matches(tokens, protocol)
    destination = _address(tokens, "a destination address")
    ports = _port_matches(tokens, protocol)
    icmp_type = icmp_code = None
    if protocol in ICMP_TYPES:
        icmp_type, icmp_code = _icmp(tokens, protocol)
    if (extra := tokens.peek()) is not None:
        raise PolicyError(f"unexpected {extra!r} after the destination")
    return check_rule(
        Rule(Action(word), protocol, source, destination, source_ports, ports, icmp_type,
             icmp_code, sequence)
    )  # fmt: skip


def _format_address(addr: Address) -> str:
    match addr:
        case AnyAddress():
            return "any"
        case Prefix(network=net) if net.prefixlen == net.max_prefixlen:
            return f"host {net.network_address}"
        case Prefix(network=net):
            return str(net)
        case VmRef(pattern=pattern):
            return f"vm:{pattern}"
        case ProfileRef(name=name):
            return f"profile:{name}"


def _format_ports(ports: tuple[PortMatch, ...]) -> list[str]:
    return [f"{m.op} {m.port}" + ("" if m.high is None else f" {m.high}") for m in ports]


def format_rule(rule: Rule) -> str:
    """The one-line form of ``rule`` (``parse_rule(format_rule(r))`` equals ``r`` but for
    its name and remark)."""
    words = [] if rule.sequence is None else [str(rule.sequence)]
    proto = rule.protocol
    words += [rule.action.value, "ip" if proto is None else _PROTOCOL_NAMES.get(proto, str(proto))]
    words += [_format_address(rule.source), *_format_ports(rule.source_ports)]
    words += [_format_address(rule.destination), *_format_ports(rule.ports)]
    if rule.icmp_type is not None:
        named = _ICMP_NAMES.get(proto or 0, {}).get((rule.icmp_type, rule.icmp_code))
        code = [] if rule.icmp_code is None else [str(rule.icmp_code)]
        words += [named] if named else [str(rule.icmp_type), *code]
    return " ".join(words)


def _whole(text: str, parse: Callable[[_Tokens], T], what: str) -> T:
    """``parse`` the words of ``text``, which must use them all."""
    tokens = _Tokens(text)
    value = parse(tokens)
    if (extra := tokens.peek()) is not None:
        raise PolicyError(f"unexpected {extra!r} after the {what}")
    return value


def parse_address(text: str, what: str = "address") -> Address:
    """One address (``any``, ``host A``, a prefix, ``vm:NAME``, ``profile:NAME``, …)."""
    return _whole(text, lambda t: _address(t, f"a {what}"), what)


def parse_ports(text: str, protocol: int | None) -> tuple[PortMatch, ...]:
    """One or more port operators (``eq 443``, ``range 1000 2000 eq 22``), or a bare port."""
    if len(text.split()) == 1 and text.strip() not in _PORT_OPS:
        text = f"eq {text}"
    if text.partition(" ")[0] not in _PORT_OPS:
        raise PolicyError(f"expected a port or 'OP PORT', got {text!r}")
    return _whole(text, lambda t: _port_matches(t, protocol), "ports")


def parse_icmp(text: str, protocol: int | None) -> tuple[int | None, int | None]:
    """An ICMP type (name or number) and optional code: (type, code or None)."""
    if protocol not in ICMP_TYPES:
        raise PolicyError("an ICMP type needs protocol icmp or icmpv6")
    return _whole(text, lambda t: _icmp(t, protocol), "ICMP type")
