"""``analyze_captures`` against tshark, run in the test, on real and generated captures.

Per TCP/UDP conversation (address and port pair) and per IP address pair, the packets and
bytes each way must equal what tshark counts; so must, per MAC address pair, those of the
flows without IP (ARP, 802.3/LLC, ...), against tshark's Ethernet conversations of the
frames without IP. vspan's flows are finer (VLAN, EtherType, endpoint, timeouts), so they
are summed up to tshark's key first.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pandas as pd
import pytest

from vspan.analysis.report import analyze_captures
from vspan_testing.tshark import conversations, fields, needs_tshark, shared_pcaps

pytestmark = [pytest.mark.tshark, needs_tshark]
NO_REASSEMBLY = [
    "-o",
    "ip.defragment:FALSE",
    "-o",
    "ipv6.defragment:FALSE",
    "-o",
    "tcp.desegment_tcp_streams:FALSE",
]
Sides = dict[frozenset[str], dict[str, list[int | None]]]
"""{unordered pair: {endpoint: [frames sent, bytes sent]}}."""


def _addr(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _add(
    out: Sides, a: str, b: str, ab: tuple[int, int | None], ba: tuple[int, int | None]
) -> None:
    sides = out.setdefault(frozenset((a, b)), {a: [0, 0], b: [0, 0]})
    for end, (frames, nbytes) in ((a, ab), (b, ba)):
        acc = sides[end]
        acc[0] = (acc[0] or 0) + frames
        acc[1] = None if nbytes is None or acc[1] is None else acc[1] + nbytes


def _ours(flows: pd.DataFrame, proto: int | None, frag: set[frozenset[str]]) -> Sides:
    """Our flows summed per unordered (A, B), A = "ip:port" for TCP/UDP, else "ip"."""
    out: Sides = {}
    sel = flows if proto is None else flows[flows["proto"] == proto]
    for row in sel.itertuples(index=False):
        if pd.isna(row.src_ip):  # a flow without IP: compared by _ours_without_ip
            continue
        a, b = _addr(row.src_ip), _addr(row.dst_ip)
        if proto is not None:
            if frozenset((a, b)) in frag:
                continue
            a, b = f"{a}:{row.src_port}", f"{b}:{row.dst_port}"
        _add(out, a, b, (row.packets, row.bytes), (row.packets_rev, row.bytes_rev))
    return out


NO_IP = "!ip && !ipv6"
"""The frames of the flows without IP, as a tshark display filter."""


def _ours_without_ip(flows: pd.DataFrame) -> Sides:
    """Our flows without IP (keyed by MACs and EtherType) summed per unordered MAC pair."""
    out: Sides = {}
    for row in flows.itertuples(index=False):
        if not pd.isna(row.src_ip):
            continue
        assert isinstance(row.src_mac, str), row  # plain Ethernet: every end by its MAC
        assert isinstance(row.dst_mac, str), row
        _add(
            out,
            row.src_mac,
            row.dst_mac,
            (row.packets, row.bytes),
            (row.packets_rev, row.bytes_rev),
        )
    return out


def _theirs_without_ip(path: Path) -> tuple[Sides, Sides]:
    """tshark's frames without IP summed per MAC pair from its per-frame dissection, and
    its Ethernet conversation table of the same frames."""
    dissected: Sides = {}
    for src, dst, length in fields(path, ["eth.src", "eth.dst", "frame.len"], display_filter=NO_IP):
        _add(dissected, src, dst, (1, int(length)), (0, 0))
    table: Sides = {}
    for (a, b), (fab, bab, fba, bba) in conversations(path, "eth", display_filter=NO_IP).items():
        _add(table, a, b, (fab, bab), (fba, bba))
    return dissected, table


def _split(endpoint: str, with_port: bool) -> tuple[str, str]:
    if not with_port:
        return _addr(endpoint), _addr(endpoint)
    host, _, port = endpoint.rpartition(":")
    return _addr(host), f"{_addr(host)}:{port}"


def _theirs(path: Path, kind: str, frag: set[frozenset[str]]) -> Sides:
    with_port = kind in ("tcp", "udp")
    out: Sides = {}
    for (a, b), (fab, bab, fba, bba) in conversations(path, kind, options=NO_REASSEMBLY).items():
        (ha, ka), (hb, kb) = _split(a, with_port), _split(b, with_port)
        if with_port and frozenset((ha, hb)) in frag:
            continue
        _add(out, ka, kb, (fab, bab), (fba, bba))
    return out


def _fragmented(path: Path) -> set[frozenset[str]]:
    """Address pairs that carry IP fragments: with reassembly off tshark sees ports only in
    first fragments, while vspan joins later fragments to their datagram's flow; those pairs
    are compared at the IP level."""
    rows = fields(
        path,
        ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst"],
        options=NO_REASSEMBLY,
        display_filter="ip.flags.mf == 1 || ip.frag_offset > 0 || ipv6.fraghdr",
    )
    return {frozenset(_addr(x) for x in ((r[0], r[1]) if r[0] else (r[2], r[3]))) for r in rows}


def _per_frame(
    path: Path, kind: str, frag: set[frozenset[str]]
) -> tuple[Sides, set[frozenset[str]]]:
    """Conversations summed from tshark's per-frame dissection — per address pair for
    ``kind`` "ip", per address/port pair for "tcp"/"udp" (ICMP errors, which quote an inner
    header, excluded) — and the conversations holding snaplen-cut frames or fragments."""
    ports = [f"{kind}.srcport", f"{kind}.dstport"] if kind != "ip" else []
    names = ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "frame.len", "frame.cap_len", *ports]
    display = "ip || ipv6" if kind == "ip" else f"{kind} && !icmp && !icmpv6"
    out: Sides = {}
    special: set[frozenset[str]] = set()
    for r in fields(path, names, options=NO_REASSEMBLY, display_filter=display):
        src, dst = (r[0], r[1]) if r[0] else (r[2], r[3])
        if not src:  # an IP header too short for addresses: vspan's "truncated at IP"
            continue
        pair = frozenset((_addr(src), _addr(dst)))
        if ports and pair in frag:
            continue
        a, b = (
            (f"{_addr(src)}:{r[6]}", f"{_addr(dst)}:{r[7]}") if ports else (_addr(src), _addr(dst))
        )
        _add(out, a, b, (1, int(r[4])), (0, 0))
        if r[4] != r[5] or pair in frag:
            special.add(frozenset((a, b)))
    return out, special


def _compare(ours: Sides, theirs: Sides) -> None:
    assert set(theirs) - set(ours) == set(), "conversations tshark has and vspan lacks"
    assert set(ours) - set(theirs) == set(), "conversations vspan has and tshark lacks"
    for key, sides in theirs.items():
        for end, (frames, nbytes) in sides.items():
            got_frames, got_bytes = ours[key][end]
            assert got_frames == frames, (sorted(key), end)
            if nbytes is not None:
                assert got_bytes == nbytes, (sorted(key), end)


@pytest.mark.parametrize("path", shared_pcaps(), ids=lambda p: p.name)
def test_real_captures_match_tshark_conversations(path: Path) -> None:
    report = analyze_captures([path])
    frag = _fragmented(path)
    for kind, proto in (("tcp", 6), ("udp", 17), ("ip", None)):
        ours = _ours(report.flows, proto, frag)
        dissected, special = _per_frame(path, kind, frag)
        _compare(ours, dissected)
        # tshark's conversation tables leave out frames whose TCP header the snaplen cut and,
        # with reassembly off, IPv6 fragments after the first; all else must match exactly.
        table: Sides = {}
        for conv_kind in ("ip", "ipv6") if kind == "ip" else (kind,):
            table.update(_theirs(path, conv_kind, frag if proto else set()))
        _compare(
            {k: v for k, v in ours.items() if k not in special},
            {k: v for k, v in table.items() if k not in special},
        )
    without_ip = _ours_without_ip(report.flows)
    for theirs in _theirs_without_ip(path):
        _compare(without_ip, theirs)


@pytest.mark.skipif(not shared_pcaps(), reason="../shared/pcaps is not beside the repo")
def test_fragments_of_a_datagram_count_in_its_flow() -> None:
    path = next(p for p in shared_pcaps() if "defrag" in p.name)
    # tshark with reassembly (its default) finds the datagram's ports; per frame, the fragments.
    ports = fields(path, ["tcp.srcport", "tcp.dstport"], display_filter="tcp")
    frags = fields(path, ["frame.len"], options=NO_REASSEMBLY, display_filter="ipv6.fraghdr")
    flows = analyze_captures([path]).flows
    assert len(flows) == 1
    flow = flows.iloc[0]
    assert [str(flow["src_port"]), str(flow["dst_port"])] == ports[0]
    assert flow["packets"] + flow["packets_rev"] == len(frags)
    assert flow["bytes"] + flow["bytes_rev"] == sum(int(r[0]) for r in frags)
