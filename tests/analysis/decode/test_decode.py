"""``decode_batch``: frames built layer by layer, every truncation, malformed headers,
batches (copies, halves, the kernel's chunk boundaries, odd buffers) and arbitrary bytes.

Expected values come from how each frame was built (``vspan_testing.decode_frames``), never from
the decoder's output.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode._common import CHUNK
from vspan.analysis.decode.columns import NO_MAC, Decoded, Layer, Status, TagKind
from vspan.batch import FrameBatch, LinkType
from vspan_testing.decode_frames import (
    IP4_TCP,
    IP6_UDP,
    Built,
    Eth,
    Ext,
    IPv4,
    IPv6,
    Tcp,
    Udp,
    Vlan,
    build,
    catalogue,
    patched,
    vlans,
)

CATALOGUE = catalogue()
PASSED_THROUGH = {"ts_ns", "caplen", "wirelen", "host", "iface"}
DEFAULTS = {
    "vlan_outer": -1,
    "vlan_inner": -1,
    "l3_offset": -1,
    "l4_offset": -1,
    "dst_mac": int(NO_MAC),
    "src_mac": int(NO_MAC),
}
HASHED = {"fingerprint"}
"""Checked by what it must do (``test_fingerprint_*``), and here only whether it is set."""


def batch_of(frames: list[bytes], linktype: int = LinkType.ETHERNET, **kw: Any) -> FrameBatch:
    return FrameBatch.from_frames(frames, linktype=linktype, **kw)


def row(d: Decoded, i: int) -> dict[str, int]:
    return {name: int(col[i]) for name, col in d.columns().items()}


def check_row(d: Decoded, i: int, built: Built, n: int | None = None) -> None:
    status, layer, exp, unchecked = built.expect(n)
    got = row(d, i)
    where = f"{built.name} cut at {n}" if n is not None else built.name
    assert (got["status"], got["layer"]) == (status, layer), where
    wrong = {
        name: (got[name], exp.get(name, DEFAULTS.get(name, 0)))
        for name in Decoded.column_names()
        if name not in PASSED_THROUGH | {"status", "layer"} | HASHED | unchecked
        and got[name] != exp.get(name, DEFAULTS.get(name, 0))
    }
    assert not wrong, f"{where}: column: (decoded, built) {wrong}"
    if n is None:  # a whole IP packet has an identity; cuts: test_fingerprint_needs_...
        has_ip = status == Status.OK and exp.get("ip_version", 0) != 0
        assert (got["fingerprint"] != 0) == has_ip, where


@pytest.mark.parametrize("built", CATALOGUE, ids=lambda b: b.name)
def test_frame_decodes_as_built(built: Built) -> None:
    d = decode_batch(batch_of([built.data], built.linktype))
    check_row(d, 0, built)
    assert len(d) == 1
    assert d.status.dtype == np.uint8


@pytest.mark.parametrize("built", CATALOGUE, ids=lambda b: b.name)
def test_every_truncation_stops_in_the_layer_cut(built: Built) -> None:
    # One batch holds every cut of the frame, so the bytes after a cut frame are the next
    # frame's: the decoder must not read them as its own.
    cuts = list(range(len(built.data) + 1))
    frames = [built.data[:n] for n in cuts]
    d = decode_batch(batch_of(frames, built.linktype, origlen=[len(built.data)] * len(cuts)))
    for i, n in enumerate(cuts):
        check_row(d, i, built, n)
    assert (d.wirelen == len(built.data)).all()
    assert (d.caplen == np.array(cuts)).all()


def test_a_mixed_batch_decodes_each_frame_as_alone() -> None:
    by_type: dict[int, list[Built]] = {}
    for b in CATALOGUE:
        by_type.setdefault(b.linktype, []).append(b)
    for linktype, built in by_type.items():
        d = decode_batch(batch_of([b.data for b in built], linktype))
        for i, b in enumerate(built):
            check_row(d, i, b)


def test_frames_of_several_link_types_in_one_batch() -> None:
    built = CATALOGUE
    batch = batch_of([b.data for b in built])
    batch = FrameBatch(
        data=batch.data, offset=batch.offset, caplen=batch.caplen, origlen=batch.origlen,
        ts_ns=batch.ts_ns, linktype=np.array([b.linktype for b in built], np.uint16),
    )  # fmt: skip
    d = decode_batch(batch)
    for i, b in enumerate(built):
        check_row(d, i, b)


def test_pass_through_columns() -> None:
    b = CATALOGUE[0]
    batch = batch_of([b.data, b.data[:20]], ts_ns=[5, 7], origlen=[len(b.data), 99], host=[3, 4])
    batch = FrameBatch(
        data=batch.data, offset=batch.offset, caplen=batch.caplen, origlen=batch.origlen,
        ts_ns=batch.ts_ns, linktype=batch.linktype, host=batch.host,
        iface=np.array([1, 2], np.int32),
    )  # fmt: skip
    d = decode_batch(batch)
    assert d.ts_ns.tolist() == [5, 7]
    assert d.caplen.tolist() == [len(b.data), 20]
    assert d.wirelen.tolist() == [len(b.data), 99]
    assert d.host.tolist() == [3, 4]
    assert d.iface.tolist() == [1, 2]


def test_empty_batch_gives_empty_columns() -> None:
    d = decode_batch(batch_of([]))
    assert len(d) == 0
    assert all(col.shape == (0,) for col in d.columns().values())


# --- headers that contradict their format -----------------------------------------------

TCP = Tcp()


@pytest.mark.parametrize(
    ("frame", "linktype", "status", "layer"),
    [
        pytest.param(patched(IP4_TCP, 14, b"\x55"), 1, Status.MALFORMED, Layer.IP, id="ipv4 version 5"),
        pytest.param(patched(IP4_TCP, 14, b"\x65"), 1, Status.MALFORMED, Layer.IP, id="ipv6 nibble on 0x0800"),
        pytest.param(patched(IP4_TCP, 14, b"\x44"), 1, Status.MALFORMED, Layer.IP, id="ihl 4"),
        pytest.param(patched(IP4_TCP, 16, b"\x00\x13"), 1, Status.MALFORMED, Layer.IP, id="total length 19"),
        pytest.param(patched(IP4_TCP, 16, b"\x00\x1e"), 1, Status.MALFORMED, Layer.L4, id="tcp past total length"),
        pytest.param(patched(IP4_TCP, 14, b"\x4f"), 1, Status.MALFORMED, Layer.IP, id="ihl 15 over length"),
        pytest.param(patched(IP4_TCP, 14, b"\x4f\x00\x01\x00"), 1, Status.TRUNCATED, Layer.IP,
                     id="ihl 15 not captured"),
        pytest.param(patched(IP4_TCP, 46, b"\x40"), 1, Status.MALFORMED, Layer.L4, id="tcp data offset 4"),
        pytest.param(patched(IP4_TCP, 46, b"\xf0"), 1, Status.MALFORMED, Layer.L4, id="tcp data offset 15"),
        pytest.param(patched(IP6_UDP, 14, b"\x40"), 1, Status.MALFORMED, Layer.IP, id="ipv4 nibble on 0x86dd"),
        pytest.param(patched(IP6_UDP, 18, b"\x00\x04"), 1, Status.MALFORMED, Layer.L4, id="udp past ipv6 payload"),
        pytest.param(b"\x55" + IP4_TCP[15:], 101, Status.MALFORMED, Layer.IP, id="raw version 5"),
        pytest.param(b"", 101, Status.TRUNCATED, Layer.IP, id="raw empty"),
        pytest.param(IP4_TCP, 147, Status.UNSUPPORTED, Layer.LINK, id="linktype 147"),
        pytest.param(IP4_TCP[:12] + vlans(8) + IP4_TCP[12:], 1, Status.OK, Layer.NONE, id="8 vlans"),
        pytest.param(IP4_TCP[:12] + vlans(9) + IP4_TCP[12:], 1, Status.MALFORMED, Layer.VLAN, id="9 vlans"),
        pytest.param(IP4_TCP[:12] + vlans(7) + b"\x89\x26" + bytes(4) + IP4_TCP[12:], 1,
                     Status.OK, Layer.NONE, id="7 vlans and a vntag"),
        pytest.param(IP4_TCP[:12] + vlans(4) + b"\x89\x26" + bytes(4) + vlans(4) + IP4_TCP[12:], 1,
                     Status.MALFORMED, Layer.VLAN, id="8 vlans around a vntag"),
        pytest.param(IP4_TCP[:12] + (b"\x89\x26" + bytes(4)) * 2 + IP4_TCP[12:], 1,
                     Status.MALFORMED, Layer.TAG, id="two vntags"),
        pytest.param(IP4_TCP[:12] + b"\x89\x26" + bytes(4) + b"\x89\x3f" + bytes(6) + IP4_TCP[12:], 1,
                     Status.MALFORMED, Layer.TAG, id="vntag and etag"),
    ],
)  # fmt: skip
def test_malformed_and_unsupported(
    frame: bytes, linktype: int, status: Status, layer: Layer
) -> None:
    d = decode_batch(batch_of([frame], linktype))
    assert (d.status[0], d.layer[0]) == (status, layer)


def test_fields_before_the_fault_stay_filled() -> None:
    d = row(decode_batch(batch_of([patched(IP4_TCP, 46, b"\x40")])), 0)  # data offset 4
    assert (d["ip_version"], d["src_port"], d["dst_port"]) == (4, TCP.sport, TCP.dport)
    assert d["tcp_flags"] == 0  # tshark shows no flags after a bogus header length
    d = row(decode_batch(batch_of([patched(IP4_TCP, 14, b"\x44")])), 0)
    assert (d["ip_version"], d["l3_offset"], d["src_ip_lo"], d["l4_offset"]) == (4, 14, 0, -1)


def test_eight_vlans_are_all_counted() -> None:
    d = row(decode_batch(batch_of([IP4_TCP[:12] + vlans(8) + IP4_TCP[12:]])), 0)
    assert (d["vlan_depth"], d["vlan_outer"], d["vlan_inner"]) == (8, 100, 107)
    assert (d["l3_offset"], d["ethertype"]) == (14 + 32, 0x0800)


def test_ipv4_total_length_0_is_taken_from_the_frame() -> None:
    # TCP segmentation offload: the capture shows 0 (tshark does the same).
    d = row(decode_batch(batch_of([patched(IP4_TCP, 16, b"\x00\x00")])), 0)
    assert (d["status"], d["payload_len"]) == (Status.OK, 10)


def test_ipv6_payload_length_0_is_taken_from_the_frame() -> None:
    d = row(decode_batch(batch_of([patched(IP6_UDP, 18, b"\x00\x00")])), 0)
    assert (d["status"], d["payload_len"]) == (Status.OK, 6)


@pytest.mark.parametrize("length", [0, 7, 15, 1000])
def test_inconsistent_udp_length_falls_back_to_the_ip_payload(length: int) -> None:
    frame = patched(IP6_UDP, 54 + 4, struct.pack("!H", length))
    d = row(decode_batch(batch_of([frame])), 0)
    assert (d["status"], d["payload_len"]) == (Status.OK, 6)


def test_consistent_udp_length_shorter_than_the_ip_payload() -> None:
    frame = patched(IP6_UDP, 54 + 4, struct.pack("!H", 10))  # 2 bytes of IP padding
    assert row(decode_batch(batch_of([frame])), 0)["payload_len"] == 2


def test_ipv6_extension_chain_past_the_payload_length() -> None:
    b = build("hbh", Eth(), IPv6(), Ext(0, 2), Udp()).data
    d = row(decode_batch(batch_of([patched(b, 18, b"\x00\x10")])), 0)  # 16 < 24 bytes of HBH
    assert (d["status"], d["layer"], d["ip_proto"]) == (Status.MALFORMED, Layer.IP_EXT, 0)


def test_nine_ipv6_extension_headers_are_too_many() -> None:
    ok = build("8", Eth(), IPv6(), *[Ext(60)] * 8, Udp()).data
    bad = build("9", Eth(), IPv6(), *[Ext(60)] * 9, Udp()).data
    d = decode_batch(batch_of([ok, bad]))
    assert (d.status.tolist(), d.layer.tolist()) == ([0, 2], [0, Layer.IP_EXT])
    assert d.l4_offset[0] == 14 + 40 + 8 * 8


def test_null_link_with_another_family_is_not_ip() -> None:
    d = row(decode_batch(batch_of([struct.pack("<I", 7) + IP4_TCP[14:]], LinkType.NULL)), 0)
    assert (d["status"], d["ip_version"], d["ethertype"], d["l3_offset"]) == (0, 0, 0, -1)


def test_tag_fields_from_the_spec_masks() -> None:
    # spec/vntag.md: "tag bytes c0 05 a0 33 decode as d=1, p=1, dvif=5, l=1, r=0,
    # version=2, svif=51".
    frame = IP4_TCP[:12] + bytes.fromhex("8926c005a033") + IP4_TCP[12:]
    d = row(decode_batch(batch_of([frame])), 0)
    assert (d["tag_kind"], d["tag_d"], d["tag_p"], d["dvif"], d["tag_l"]) == (1, 1, 1, 5, 1)
    assert (d["tag_version"], d["svif"], d["ethertype"]) == (2, 51, 0x0800)
    # E-TAG: E-PCP 3, E-DEI 1, ingress base 0x123, GRP 2, E-CID base 0x456, exts 0x78 0x9a
    frame = IP4_TCP[:12] + bytes.fromhex("893f 7123 2456 789a".replace(" ", "")) + IP4_TCP[12:]
    d = row(decode_batch(batch_of([frame])), 0)
    assert (d["tag_kind"], d["etag_pcp"], d["etag_dei"], d["etag_grp"]) == (TagKind.ETAG, 3, 1, 2)
    assert (d["svif"], d["dvif"]) == (0x78123, 0x9A456)


# --- batches ------------------------------------------------------------------------------


def assert_same(a: Decoded, b: Decoded) -> None:
    for name, col in a.columns().items():
        other = getattr(b, name)
        assert col.dtype == other.dtype, name
        np.testing.assert_array_equal(col, other, err_msg=name)


def test_copies_of_a_frame_give_identical_rows_across_chunks() -> None:
    b = next(x for x in CATALOGUE if x.name == "vlan vntag vlan")
    n = 2 * CHUNK + 3
    d = decode_batch(batch_of([b.data] * n))
    one = decode_batch(batch_of([b.data]))
    assert_same(d, Decoded.concat([one] * n))


def test_a_batch_decodes_as_its_halves() -> None:
    frames = [b.data[:n] for b in CATALOGUE if b.linktype == LinkType.ETHERNET
              for n in range(0, len(b.data) + 1, 7)]  # fmt: skip
    frames = frames * (CHUNK // len(frames) + 1)
    whole = decode_batch(batch_of(frames))
    half = len(frames) // 2
    parts = [decode_batch(batch_of(frames[:half])), decode_batch(batch_of(frames[half:]))]
    assert_same(whole, Decoded.concat(parts))


def test_frames_spaced_in_the_buffer_do_not_see_their_neighbours() -> None:
    # Bytes between frames (and after the last one) look like a valid continuation.
    full = build("x", Eth(), Vlan(9), IPv4(), Tcp()).data
    frames = [full[:n] for n in (13, 16, 17, 30, 40, 55)]
    data = b"".join(f + full[len(f) :] for f in frames)
    offset = np.cumsum([0] + [len(full)] * (len(frames) - 1))
    batch = FrameBatch(
        data=np.frombuffer(data, np.uint8), offset=offset.astype(np.int64),
        caplen=np.array([len(f) for f in frames], np.int32),
        origlen=np.full(len(frames), len(full), np.int32), ts_ns=np.zeros(len(frames), np.int64),
        linktype=np.ones(len(frames), np.uint16),
    )  # fmt: skip
    alone = Decoded.concat([decode_batch(batch_of([f], origlen=[len(full)])) for f in frames])
    assert_same(decode_batch(batch), alone)
    assert (decode_batch(batch).status == Status.TRUNCATED).all()


def test_offsets_outside_the_buffer_are_empty_frames() -> None:
    batch = FrameBatch(
        data=np.frombuffer(IP4_TCP, np.uint8), offset=np.array([0, 10**9, -5], np.int64),
        caplen=np.array([len(IP4_TCP), 60, 60], np.int32), origlen=np.full(3, 60, np.int32),
        ts_ns=np.zeros(3, np.int64), linktype=np.ones(3, np.uint16),
    )  # fmt: skip
    d = decode_batch(batch)
    assert d.status.tolist() == [Status.OK, Status.TRUNCATED, Status.TRUNCATED]
    assert d.layer.tolist() == [Layer.NONE, Layer.LINK, Layer.LINK]


def test_a_read_only_buffer_decodes_the_same() -> None:
    # Capture files are read through a read-only memory map.
    batch = batch_of([b.data for b in CATALOGUE if b.linktype == LinkType.ETHERNET])
    data = batch.data.copy()
    data.flags.writeable = False
    ro = FrameBatch(
        data=data, offset=batch.offset, caplen=batch.caplen, origlen=batch.origlen,
        ts_ns=batch.ts_ns, linktype=batch.linktype,
    )  # fmt: skip
    assert_same(decode_batch(ro), decode_batch(batch))


JUMBO_UDP = patched(patched(IP6_UDP, 18, b"\x00\x00"), 58, b"\x00\x00")
"""IPv6 payload length 0 (taken from the wire length), UDP length 0 (the IP payload is used)."""


@pytest.mark.parametrize(
    ("frame", "wirelen", "payload_len"),
    [
        pytest.param(patched(IP4_TCP, 16, b"\x00\x00"), 2**31 - 1, 2**31 - 1 - 14 - 20 - 20,
                     id="ipv4 offload, largest wire length"),
        pytest.param(patched(IP4_TCP, 16, b"\x00\x00"), -(2**31) + 10, 2**31 - 4 - 20 - 20,
                     id="ipv4 offload, int32 wraps"),
        pytest.param(JUMBO_UDP, 2**31 - 1, 2**31 - 1 - 14 - 40 - 8,
                     id="ipv6 jumbogram, largest wire length"),
        pytest.param(JUMBO_UDP, -(2**31) + 30, 2**31 - 24 - 8, id="ipv6 jumbogram, int32 wraps"),
    ],
)  # fmt: skip
def test_lengths_taken_from_the_wire_are_int32(
    frame: bytes, wirelen: int, payload_len: int
) -> None:
    # Computed as the int32 columns hold them: near the int32 limits the length wraps.
    d = row(decode_batch(batch_of([frame], origlen=[wirelen])), 0)
    assert d["payload_len"] == payload_len


def test_link_types_must_match_the_frames() -> None:
    batch = batch_of([IP4_TCP, IP4_TCP])
    bad = FrameBatch(
        data=batch.data, offset=batch.offset, caplen=batch.caplen, origlen=batch.origlen,
        ts_ns=batch.ts_ns, linktype=batch.linktype[:1],
    )  # fmt: skip
    with pytest.raises(ValueError, match="link types"):
        decode_batch(bad)


# --- arbitrary bytes ----------------------------------------------------------------------

LINKTYPES = st.sampled_from([0, 1, 101, 113, 276, 147])


def check_total(d: Decoded, n: int) -> None:
    assert all(col.shape == (n,) for col in d.columns().values())
    assert ((d.status == Status.OK) == (d.layer == Layer.NONE)).all()
    assert (d.status <= Status.UNSUPPORTED).all()
    assert (d.payload_len >= 0).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.binary(max_size=120), max_size=20), linktype=LINKTYPES)
def test_arbitrary_bytes_never_raise(frames: list[bytes], linktype: int) -> None:
    check_total(decode_batch(batch_of(frames, linktype)), len(frames))


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(CATALOGUE) - 1),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 200),
)
def test_mutated_valid_frames_never_raise(
    index: int, edits: list[tuple[int, int]], cut: int
) -> None:
    b = CATALOGUE[index]
    frame = bytearray(b.data)
    for at, value in edits:
        if at < len(frame):
            frame[at] = value
    frames = [bytes(frame), bytes(frame[:cut]), b.data]
    d = decode_batch(batch_of(frames, b.linktype))
    check_total(d, 3)
    check_row(d, 2, b)  # the neighbours' damage does not leak into a good frame
