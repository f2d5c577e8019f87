"""The one-line ACL grammar: each example's structure written by hand from the NX-OS grammar,
every error message pinned, and ``format_rule`` as the exact inverse of ``parse_rule``."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vspan.analysis.policy.acl import (
    ANY,
    ICMP_TYPES,
    Action,
    PortMatch,
    PortOp,
    Prefix,
    ProfileRef,
    Rule,
    VmRef,
    format_rule,
    parse_rule,
)
from vspan.errors import PolicyError

PERMIT, DENY = Action.PERMIT, Action.DENY
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58


def net(text: str) -> Prefix:
    return Prefix(ipaddress.ip_network(text))


def eq(port: int) -> PortMatch:
    return PortMatch(PortOp.EQ, port)


# (text, structure): `[seq] action proto src [src-ports] dst [dst-ports] [icmp-type [code]]`
PARSED = [
    (
        "permit tcp any 10.1.0.0/16 eq 443",
        Rule(PERMIT, TCP, ANY, net("10.1.0.0/16"), ports=(eq(443),)),
    ),
    (
        "deny udp 10.0.0.0/8 range 1000 2000 any",
        Rule(
            DENY, UDP, net("10.0.0.0/8"), ANY, source_ports=(PortMatch(PortOp.RANGE, 1000, 2000),)
        ),
    ),
    ("permit icmp any any echo", Rule(PERMIT, ICMP, icmp_type=8)),
    ("permit icmp any any echo-reply", Rule(PERMIT, ICMP, icmp_type=0)),
    ("permit icmp any any unreachable", Rule(PERMIT, ICMP, icmp_type=3)),
    ("permit icmp any any port-unreachable", Rule(PERMIT, ICMP, icmp_type=3, icmp_code=3)),
    ("permit icmp any any time-exceeded", Rule(PERMIT, ICMP, icmp_type=11)),
    ("permit icmp any any 3 4", Rule(PERMIT, ICMP, icmp_type=3, icmp_code=4)),
    ("permit icmp any any 8", Rule(PERMIT, ICMP, icmp_type=8)),
    ("permit icmpv6 fd00::/16 any echo", Rule(PERMIT, ICMP6, net("fd00::/16"), icmp_type=128)),
    ("permit icmpv6 any any echo-reply", Rule(PERMIT, ICMP6, icmp_type=129)),
    ("deny ip any profile:db", Rule(DENY, None, ANY, ProfileRef("db"))),
    ("permit tcp vm:web-01 any eq 8080", Rule(PERMIT, TCP, VmRef("web-01"), ports=(eq(8080),))),
    ("permit ip vm:web-* profile:app", Rule(PERMIT, None, VmRef("web-*"), ProfileRef("app"))),
    ("permit tcp host 10.1.0.5 any", Rule(PERMIT, TCP, net("10.1.0.5/32"))),
    ("permit tcp 10.1.0.5 any", Rule(PERMIT, TCP, net("10.1.0.5/32"))),
    (
        "permit tcp any host fd00::1 neq 22",
        Rule(PERMIT, TCP, ANY, net("fd00::1/128"), ports=(PortMatch(PortOp.NEQ, 22),)),
    ),
    (
        "permit tcp any gt 1023 any lt 1024",
        Rule(
            PERMIT,
            TCP,
            source_ports=(PortMatch(PortOp.GT, 1023),),
            ports=(PortMatch(PortOp.LT, 1024),),
        ),
    ),
    (
        "10 permit tcp 10.1.0.0 0.0.255.255 any eq www",
        Rule(PERMIT, TCP, net("10.1.0.0/16"), ports=(eq(80),), sequence=10),
    ),
    ("permit udp any eq domain any", Rule(PERMIT, UDP, source_ports=(eq(53),))),
    ("permit 47 any any", Rule(PERMIT, 47)),
    ("permit gre any any", Rule(PERMIT, 47)),
    ("permit sctp any any range 1 10", Rule(PERMIT, 132, ports=(PortMatch(PortOp.RANGE, 1, 10),))),
    ("deny tcp any any eq 22 eq 23", Rule(DENY, TCP, ports=(eq(22), eq(23)))),
    ("  permit   ip  any   any ", Rule(PERMIT, None)),
]


@pytest.mark.parametrize(("text", "rule"), PARSED, ids=[t for t, _ in PARSED])
def test_one_line_form(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule


ERRORS = [
    ("", "empty rule: expected 'permit' or 'deny'"),
    ("allow tcp any any", "expected 'permit' or 'deny', got 'allow'"),
    (
        "remark web tier",
        "expected 'permit' or 'deny', got 'remark'; a remark goes in a rule's 'remark' field",
    ),
    ("10", "after '10': expected 'permit' or 'deny'"),
    ("permit tpc any any", "unknown protocol 'tpc'"),
    ("permit 256 any any", "protocol 256 out of range 0..255"),
    ("permit tcp", "after 'tcp': expected a source address"),
    ("permit tcp any", "after 'any': expected a destination address"),
    (
        "permit tcp 10.1.0.1/16 any",
        "bad prefix '10.1.0.1/16': host bits set; did you mean 10.1.0.0/16?",
    ),
    (
        "permit tcp fd00::1/16 any",
        "bad prefix 'fd00::1/16': host bits set; did you mean fd00::/16?",
    ),
    ("permit tcp 10.1.0.0/33 any", "bad prefix '10.1.0.0/33'"),
    ("permit tcp host any any", "bad address 'any'"),
    ("permit tcp host", "after 'host': expected an address after 'host'"),
    ("permit tcp nowhere any", "bad address 'nowhere'"),
    ("permit tcp 10.1.0.300 any", "bad address '10.1.0.300'"),
    (
        "permit tcp 10.1.0.0 0.255.0.255 any",
        "wildcard mask '0.255.0.255' is not contiguous; write a prefix",
    ),
    ("permit ip vm: any", "vm: needs a name, got 'vm:'"),
    ("permit ip any profile:", "profile: needs a name, got 'profile:'"),
    ("permit tcp any any range 2000 1000", "port range out of order: 2000 > 1000"),
    ("permit tcp any any eq 70000", "port 70000 out of range 0..65535"),
    ("permit tcp any any eq http", "bad port 'http'"),
    ("permit tcp any any eq", "after 'eq': expected a port after 'eq'"),
    ("permit tcp any any range 1", "after '1': expected the high port of 'range'"),
    ("permit tcp any any lt 0", "'lt 0' matches no port"),
    ("permit udp any gt 65535 any", "'gt 65535' matches no port"),
    ("permit ip any any eq 80", "port operator 'eq' needs protocol tcp, udp or sctp, not ip"),
    ("permit icmp any eq 80 any", "port operator 'eq' needs protocol tcp, udp or sctp, not icmp"),
    ("permit icmp any any echoo", "unknown ICMP type 'echoo'"),
    ("permit icmp any any 300", "ICMP type 300 out of range 0..255"),
    ("permit icmp any any 3 x", "bad ICMP code 'x'"),
    ("permit icmp any any echo 0", "unexpected '0' after the destination"),
    ("permit icmpv6 any any nd-xx", "unknown ICMP type 'nd-xx'"),
    ("permit tcp any any echo", "unexpected 'echo' after the destination"),
    ("permit tcp any any log", "unexpected 'log' after the destination"),
    (
        "permit ip 10.0.0.0/8 fd00::/8",
        "source 10.0.0.0/8 and destination fd00::/8 are of different IP families; the rule can never match",
    ),
    ("permit icmp any fd00::/8", "protocol icmp never carries IPv6 destination fd00::/8"),
    ("permit icmpv6 10.0.0.0/8 any", "protocol icmpv6 never carries IPv4 source 10.0.0.0/8"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[t or "<empty>" for t, _ in ERRORS])
def test_errors_name_the_token(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_rule(text)
    assert str(info.value) == message


def test_named_icmp_types_differ_between_icmp_and_icmpv6() -> None:
    assert ICMP_TYPES[1]["echo"] == (8, None)
    assert ICMP_TYPES[58]["echo"] == (128, None)
    assert parse_rule("permit icmpv6 any any unreachable").icmp_type == 1


def test_format_prints_the_canonical_one_line_form() -> None:
    assert format_rule(parse_rule("10 permit tcp 10.1.0.0 0.0.255.255 any eq www")) == (
        "10 permit tcp 10.1.0.0/16 any eq 80"
    )
    assert format_rule(parse_rule("permit tcp 10.1.0.5 any")) == "permit tcp host 10.1.0.5 any"
    assert (
        format_rule(parse_rule("permit icmp any any 3 3")) == "permit icmp any any port-unreachable"
    )
    assert format_rule(parse_rule("permit icmp any any 3 9")) == "permit icmp any any 3 9"
    assert format_rule(Rule(DENY, 99)) == "deny 99 any any"


# --- properties -----------------------------------------------------------------------------

ports = st.integers(0, 65535)
port_match = st.one_of(
    st.builds(PortMatch, st.sampled_from([PortOp.EQ, PortOp.NEQ]), ports),
    st.builds(PortMatch, st.just(PortOp.LT), st.integers(1, 65535)),
    st.builds(PortMatch, st.just(PortOp.GT), st.integers(0, 65534)),
    st.tuples(ports, ports).map(lambda p: PortMatch(PortOp.RANGE, min(p), max(p))),
)
v4 = st.builds(
    lambda a, n: ipaddress.ip_network((a, n), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6 = st.builds(
    lambda a, n: ipaddress.ip_network((ipaddress.IPv6Address(a), n), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
name = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
pattern = st.from_regex(r"[A-Za-z0-9_.*?-]{1,12}", fullmatch=True)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    protocol = draw(st.sampled_from([None, TCP, UDP, 132, ICMP, ICMP6, 47, 0, 255]))
    family = {ICMP: v4, ICMP6: v6}.get(protocol or -1, draw(st.sampled_from([v4, v6])))
    address = st.one_of(st.just(ANY), family.map(Prefix), pattern.map(VmRef), name.map(ProfileRef))
    with_ports = protocol in (TCP, UDP, 132)
    port_lists = st.lists(port_match, max_size=3).map(tuple) if with_ports else st.just(())
    icmp_type = icmp_code = None
    if protocol in (ICMP, ICMP6) and draw(st.booleans()):
        icmp_type = draw(st.integers(0, 255))
        icmp_code = draw(st.none() | st.integers(0, 255))
    return Rule(
        action=draw(st.sampled_from(Action)),
        protocol=protocol,
        source=draw(address),
        destination=draw(address),
        source_ports=draw(port_lists),
        ports=draw(port_lists),
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        sequence=draw(st.none() | st.integers(1, 2**32 - 1)),
    )


@given(rules())
def test_parse_inverts_format(rule: Rule) -> None:
    assert parse_rule(format_rule(rule)) == rule


WORDS = ["permit", "deny", "tcp", "udp", "icmp", "ip", "any", "host", "eq", "range", "lt", "gt",
         "10.1.0.0/16", "10.1.0.1", "0.0.255.255", "fd00::/8", "vm:web-*", "profile:db", "echo",
         "443", "70000", "-1", "x", "3", "/", ":"]  # fmt: skip


@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=9))
@example(["²", "permit", "ip", "any", "any"])  # a digit to str.isdigit, not to int()
@example(["permit", "tcp", "any", "any", "eq", "²"])
def test_any_text_parses_or_raises_policy_error(words: list[str]) -> None:
    try:
        rule = parse_rule(" ".join(words))
    except PolicyError:
        return
    assert parse_rule(format_rule(rule)) == rule
