"""VN-Tag and E-TAG codecs: the spec's worked example, round trips, and tshark as the oracle."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import dpkt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.errors import DecodeError, TruncatedError
from vspan.wire.vntag import (
    ETag,
    VnTag,
    decode_etag,
    decode_vntag,
    decode_vntag_array,
    encode_etag,
    encode_vntag,
    encode_vntag_array,
)

vntags = st.builds(
    VnTag,
    d=st.integers(0, 1),
    p=st.integers(0, 1),
    dvif=st.integers(0, 0x3FFF),
    l=st.integers(0, 1),
    r=st.integers(0, 1),
    version=st.integers(0, 3),
    svif=st.integers(0, 0xFFF),
    ethertype=st.integers(0, 0xFFFF),
)
etags = st.builds(
    ETag,
    pcp=st.integers(0, 7),
    dei=st.integers(0, 1),
    iecid=st.integers(0, 0xFFFFF),
    resv=st.integers(0, 3),
    grp=st.integers(0, 3),
    ecid=st.integers(0, 0xFFFFF),
    ethertype=st.integers(0, 0xFFFF),
)


def test_worked_example_of_the_spec() -> None:
    # spec/vntag.md: "tag bytes c0 05 a0 33 decode as d=1, p=1, dvif=5, l=1, r=0, version=2,
    # svif=51".
    tag = decode_vntag(bytes.fromhex("c005a033") + b"\x81\x00")
    assert tag == VnTag(d=1, p=1, dvif=5, l=1, r=0, version=2, svif=51, ethertype=0x8100)
    assert encode_vntag(tag) == bytes.fromhex("c005a0338100")


@pytest.mark.parametrize(
    ("field", "mask"),
    [
        ("d", 0x80000000),
        ("p", 0x40000000),
        ("dvif", 0x3FFF0000),
        ("l", 0x00008000),
        ("r", 0x00004000),
        ("version", 0x00003000),
        ("svif", 0x00000FFF),
    ],
)
def test_each_field_sits_under_its_spec_mask(field: str, mask: int) -> None:
    top = mask >> (mask & -mask).bit_length() - 1
    word = struct.unpack("!I", encode_vntag(VnTag(**{field: top}))[:4])[0]
    assert word == mask


def test_etag_fields_sit_where_the_spec_says() -> None:
    # E-PCP 3 bits, E-DEI 1, ingress base 12, resv 2, GRP 2, E-CID base 12, ingress ext 8,
    # E-CID ext 8 — so E-CIDs are (ext << 12) | base.
    raw = bytes.fromhex("b1236456789a0800")
    tag = decode_etag(raw)
    assert (tag.pcp, tag.dei) == (0b101, 1)
    assert tag.iecid == (0x78 << 12) | 0x123
    assert (tag.resv, tag.grp) == (1, 2)
    assert tag.ecid == (0x9A << 12) | 0x456
    assert tag.ethertype == 0x0800
    assert encode_etag(tag) == raw


def test_truncated_tag_names_what_and_where() -> None:
    with pytest.raises(TruncatedError, match=r"VN-Tag truncated at offset 2: need 6 bytes, got 3"):
        decode_vntag(b"\x00\x00\xc0\x05\xa0", 2)
    with pytest.raises(TruncatedError, match=r"E-TAG truncated at offset 0: need 8 bytes, got 7"):
        decode_etag(b"\x00" * 7)


def test_out_of_range_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="svif=4096 out of range"):
        VnTag(svif=4096)
    with pytest.raises(ValueError, match="VN-Tag field dvif out of range"):
        encode_vntag_array(svif=[1], dvif=[1 << 14])


@given(vntags)
def test_vntag_round_trip(tag: VnTag) -> None:
    assert decode_vntag(encode_vntag(tag)) == tag


@given(etags)
def test_etag_round_trip(tag: ETag) -> None:
    assert decode_etag(encode_etag(tag)) == tag


@given(st.binary(max_size=12), st.integers(0, 12))
def test_arbitrary_bytes_raise_only_decode_errors(data: bytes, offset: int) -> None:
    for decoder in (decode_vntag, decode_etag):
        with contextlib.suppress(DecodeError):
            decoder(data, offset)


@given(st.lists(vntags, min_size=1, max_size=50))
def test_vectorized_codec_equals_the_scalar_one(tags: list[VnTag]) -> None:
    words = np.array([struct.unpack("!I", encode_vntag(t)[:4])[0] for t in tags], np.uint32)
    cols = decode_vntag_array(words)
    for name in ("d", "p", "dvif", "l", "r", "version", "svif"):
        assert getattr(cols, name).tolist() == [getattr(t, name) for t in tags]
    packed = encode_vntag_array(
        **{n: getattr(cols, n) for n in ("d", "p", "dvif", "l", "r", "version", "svif")}
    )
    assert packed.tolist() == words.tolist()


# --- tshark dissects what we encode -------------------------------------------------------

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
IPV4_UDP = bytes.fromhex("45000020000100004011000001010101020202020035003500080000")


def _tshark_fields(path: Path, fields: list[str]) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=\t"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [line.split("\t") for line in out.splitlines()]


@pytest.mark.tshark
@needs_tshark
@settings(max_examples=3, deadline=None)
@given(st.lists(vntags, min_size=20, max_size=40))
def test_tshark_reads_our_vntags_field_for_field(
    tmp_path_factory: pytest.TempPathFactory, tags: list[VnTag]
) -> None:
    path = tmp_path_factory.mktemp("vntag") / "tags.pcap"
    with path.open("wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for i, drawn in enumerate(tags):
            tag = VnTag(
                d=drawn.d,
                p=drawn.p,
                dvif=drawn.dvif,
                l=drawn.l,
                r=drawn.r,
                version=drawn.version,
                svif=drawn.svif,
                ethertype=0x0800,
            )
            frame = b"\x02" * 6 + b"\x04" * 6 + b"\x89\x26" + encode_vntag(tag) + IPV4_UDP
            writer.writepkt(frame, ts=1700000000 + i)
    rows = _tshark_fields(
        path, ["vntag.dir", "vntag.ptr", "vntag.dst", "vntag.looped", "vntag.version", "vntag.src"]
    )
    assert len(rows) == len(tags)
    for row, tag in zip(rows, tags, strict=True):
        got = [int(x, 0) if x not in ("True", "False") else int(x == "True") for x in row]
        assert got == [tag.d, tag.p, tag.dvif, tag.l, tag.version, tag.svif]


@pytest.mark.tshark
@needs_tshark
def test_tshark_reads_our_etags(tmp_path: Path) -> None:
    tags = [
        ETag(pcp=5, dei=1, iecid=0x7F123, grp=1, ecid=0x9A456, ethertype=0x0800),
        ETag(iecid=0xD3, ecid=0xD8, ethertype=0x0800),
    ]
    path = tmp_path / "etag.pcap"
    with path.open("wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for tag in tags:
            writer.writepkt(b"\x02" * 6 + b"\x04" * 6 + b"\x89\x3f" + encode_etag(tag) + IPV4_UDP)
    rows = _tshark_fields(
        path,
        [
            "etag.pcp",
            "etag.dei",
            "etag.iecid_base",
            "etag.group",
            "etag.ecid_base",
            "etag.iecid_ext",
            "etag.ecid_ext",
        ],
    )
    for row, tag in zip(rows, tags, strict=True):
        got = [int(x, 0) if x not in ("True", "False") else int(x == "True") for x in row]
        assert got == [
            tag.pcp,
            tag.dei,
            tag.iecid & 0xFFF,
            tag.grp,
            tag.ecid & 0xFFF,
            tag.iecid >> 12,
            tag.ecid >> 12,
        ]
