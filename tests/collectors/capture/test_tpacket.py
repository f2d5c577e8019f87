"""The TPACKET_V3 ring walker and the filter compiler, without sockets (no root needed).

The synthetic rings are built with ``struct`` from the layouts of
``/usr/include/linux/if_packet.h`` written out again here, independently of the module's
tables, and placed as the kernel places them.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.collectors.capture import _tpacket
from vspan.collectors.capture._socket import compile_filter
from vspan.collectors.capture._tpacket import (
    W_DATA,
    W_LEN,
    W_PKTTYPE,
    W_SNAPLEN,
    W_VLAN,
    Ring,
    gather,
)
from vspan.errors import ConfigError
from vspan.fields import field_offsets

BLOCK_DESC = struct.Struct("<IIIIIIQIIII")  # struct tpacket_block_desc + tpacket_hdr_v1
TPACKET3_HDR = struct.Struct("<IIIIIIHHIIHH8x")  # struct tpacket3_hdr (hv1 inlined)
SOCKADDR_LL = struct.Struct("<HHiHBB8s")  # struct sockaddr_ll
MACOFF = 82  # TPACKET_ALIGN(TPACKET3_HDRLEN + 16) - ETH_HLEN, as the kernel places frames
TP_STATUS_USER, TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 1, 1 << 4, 1 << 6


@dataclass
class Pkt:
    frame: bytes
    pkttype: int = 0
    wire_len: int | None = None
    sec: int = 1_700_000_000
    nsec: int = 5
    vlan: tuple[int, int | None] | None = None  # (tci, tpid or None)


def build_ring(blocks: list[list[Pkt] | None], block_size: int = 4096) -> bytearray:
    """Blocks of packets handed to user space; None: a block the kernel still owns."""
    ring = bytearray(block_size * len(blocks))
    for b, pkts in enumerate(blocks):
        base = b * block_size
        if pkts is None:
            continue
        p = 48
        for i, pkt in enumerate(pkts):
            snap = len(pkt.frame)
            nxt = 0 if i == len(pkts) - 1 else (MACOFF + snap + 7) // 8 * 8
            status, tci, tpid = 0, 0, 0
            if pkt.vlan is not None:
                tci, tpid = pkt.vlan[0], pkt.vlan[1] or 0
                status = TP_STATUS_VLAN_VALID | (TP_STATUS_VLAN_TPID_VALID if pkt.vlan[1] else 0)
            wire = pkt.wire_len or snap
            TPACKET3_HDR.pack_into(
                ring,
                base + p,
                nxt,
                pkt.sec,
                pkt.nsec,
                snap,
                wire,
                status,
                MACOFF,
                96,
                0,
                tci,
                tpid,
                0,
            )
            SOCKADDR_LL.pack_into(ring, base + p + 48, 17, 0, 3, 1, pkt.pkttype, 6, b"")
            ring[base + p + MACOFF : base + p + MACOFF + snap] = pkt.frame
            p += nxt
        BLOCK_DESC.pack_into(ring, base, 3, 48, TP_STATUS_USER, len(pkts), 48, p, 7, 0, 0, 0, 0)
    return ring


def frame(n: int, size: int = 60) -> bytes:
    return (
        bytes([n]) * 6
        + b"\x02\x00\x00\x00\x00\x01"
        + b"\x08\x00"
        + bytes(i % 256 for i in range(size - 14))
    )


def copy_out(ring: Ring, rows: np.ndarray, caplen: np.ndarray) -> FrameBatch:
    offset = np.zeros(len(rows), np.int64)
    np.cumsum(caplen[:-1], out=offset[1:])
    data = np.empty(int(caplen.sum()), np.uint8)
    gather(ring.view, np.ascontiguousarray(rows), caplen.astype(np.int32), data, offset)
    return FrameBatch(
        data,
        offset,
        caplen.astype(np.int32),
        caplen.astype(np.int32),
        np.zeros(len(rows), np.int64),
        np.ones(len(rows), np.uint16),
    )


def test_layouts_match_the_header() -> None:
    at = struct.calcsize
    block = field_offsets(_tpacket.BLOCK_DESC_FIELDS)
    hdr = field_offsets(_tpacket.TPACKET3_HDR_FIELDS)
    sll = field_offsets(_tpacket.SOCKADDR_LL_FIELDS)
    assert (TPACKET3_HDR.size, BLOCK_DESC.size, SOCKADDR_LL.size) == (48, 48, 20)
    assert _tpacket.TPACKET3_HDRLEN == 48 + 20
    assert block["block_status"] == at("<II")
    assert block["num_pkts"] == at("<III")
    assert block["offset_to_first_pkt"] == at("<IIII")
    assert hdr["tp_snaplen"] == at("<III")
    assert hdr["tp_len"] == at("<IIII")
    assert hdr["tp_mac"] == at("<IIIIII")
    assert hdr["tp_vlan_tci"] == at("<IIIIIIHHI")
    assert hdr["tp_vlan_tpid"] == at("<IIIIIIHHII")
    assert sll["sll_pkttype"] == at("<HHiH")


def test_walk_reads_every_packet_of_the_ready_blocks_in_order() -> None:
    pkts = [
        [Pkt(frame(1), pkttype=0), Pkt(frame(2, 100), pkttype=4, nsec=7)],
        [Pkt(frame(3, 1500))],
    ]
    ring = Ring(build_ring([*pkts, None]), 4096, 3)
    walk = ring.walk()
    assert (walk.first, walk.blocks, walk.bad) == (0, 2, 0)
    assert walk.rows[:, W_PKTTYPE].tolist() == [0, 4, 0]
    assert walk.rows[:, W_LEN].tolist() == [60, 100, 1500]
    assert walk.rows[:, W_VLAN].tolist() == [-1, -1, -1]
    batch = copy_out(ring, walk.rows, walk.rows[:, W_SNAPLEN])
    assert [batch.frame(i) for i in range(3)] == [frame(1), frame(2, 100), frame(3, 1500)]
    assert (
        walk.rows[1, _tpacket.W_SEC] * 10**9 + walk.rows[1, _tpacket.W_NSEC]
        == 1_700_000_000 * 10**9 + 7
    )


def test_walk_stops_at_the_first_kernel_block_and_wraps_around() -> None:
    ring = Ring(build_ring([[Pkt(frame(1))], None, [Pkt(frame(3))], [Pkt(frame(4))]]), 4096, 4)
    ring.next_block = 2
    walk = ring.walk()
    assert (walk.first, walk.blocks) == (2, 3)  # blocks 2, 3, then 0; block 1 is the kernel's
    assert [bytes(ring.view[r : r + 1]) for r in walk.rows[:, W_DATA]] == [
        b"\x03",
        b"\x04",
        b"\x01",
    ]
    ring.release(walk)
    assert ring.next_block == 1
    status = [struct.unpack_from("<I", ring.buffer, b * 4096 + 8)[0] for b in range(4)]
    assert status == [0, 0, 0, 0]
    assert ring.walk().blocks == 0


def test_walk_leaves_unreleased_blocks_for_the_next_walk() -> None:
    ring = Ring(build_ring([[Pkt(frame(1))], [Pkt(frame(2))]]), 4096, 2)
    assert ring.walk().blocks == 2
    again = ring.walk()  # not released: the same blocks again
    assert (again.first, again.blocks, len(again.rows)) == (0, 2, 2)


def test_empty_block_is_consumed_without_rows() -> None:
    ring = Ring(build_ring([[]]), 4096, 1)
    walk = ring.walk()
    assert (walk.blocks, len(walk.rows)) == (1, 0)


def test_vlan_tag_taken_off_by_the_kernel_is_put_back() -> None:
    plain = frame(9, 64)
    pkts = [Pkt(plain, vlan=(0x2064, None)), Pkt(plain, vlan=(7, 0x88A8))]
    ring = Ring(build_ring([pkts]), 4096, 1)
    rows = ring.walk().rows
    assert rows[:, W_VLAN].tolist() == [(0x8100 << 16) | 0x2064, (0x88A8 << 16) | 7]
    batch = copy_out(ring, rows, rows[:, W_SNAPLEN] + 4)
    assert batch.frame(0) == plain[:12] + b"\x81\x00\x20\x64" + plain[12:]
    assert batch.frame(1) == plain[:12] + b"\x88\xa8\x00\x07" + plain[12:]
    short = copy_out(ring, rows[:1], np.array([14]))  # a snaplen inside the tag
    assert short.frame(0) == plain[:12] + b"\x81\x00"


def test_truncated_packet_keeps_its_wire_length() -> None:
    ring = Ring(build_ring([[Pkt(frame(1, 64), wire_len=1514)]]), 4096, 1)
    rows = ring.walk().rows
    assert (rows[0, W_SNAPLEN], rows[0, W_LEN]) == (64, 1514)


def test_record_reaching_outside_its_block_cuts_the_block_short() -> None:
    raw = build_ring([[Pkt(frame(1)), Pkt(frame(2)), Pkt(frame(3))], [Pkt(frame(4))]])
    second = 48 + (MACOFF + 60 + 7) // 8 * 8
    struct.pack_into("<I", raw, second + 12, 5000)  # tp_snaplen past the 4096-byte block
    walk = Ring(raw, 4096, 2).walk()
    assert (walk.blocks, walk.bad, walk.bad_offset) == (2, 1, second)
    assert walk.rows[:, W_LEN].tolist() == [60, 60]  # frame 1, then block 2's frame 4


def test_bad_filter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^bpf: bad capture filter 'udp port banana': .*banana"):
        compile_filter("udp port banana", 65535)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_filter_program_is_the_one_tcpdump_compiles() -> None:
    program = compile_filter("udp port 9999", 96)
    dump = subprocess.run(
        ["tcpdump", "-ddd", "-s", "96", "-y", "EN10MB", "udp port 9999"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    insns = [tuple(map(int, dump[i : i + 4])) for i in range(1, len(dump), 4)]
    assert int(dump[0]) == len(program) // 8
    assert [struct.unpack_from("<HBBI", program, 8 * i) for i in range(len(insns))] == insns
