"""Tests of vspan.bpf: the batch BPF interpreter against libpcap's own.

The oracle is libpcap's ``bpf_filter`` (its reference interpreter, called per frame through
ctypes): for libpcap expressions that exercise every instruction class (loads of each width
and mode, scratch memory, every ALU operation, every jump) and for hand-written programs
(division by zero, shifts by 32 and more), over real frames (UDP, TCP, ICMP, ARP, IPv6,
802.1Q) built with dpkt, truncated at random (``caplen < origlen``), and random bytes.
"""

from __future__ import annotations

import ctypes
import functools
import random
import struct

import dpkt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan import bpf
from vspan.batch import FrameBatch
from vspan.bpf import (
    BpfInsn,
    PacketFilter,
    check_program,
    compile_filter,
    libpcap,
    run_bpf,
)
from vspan.errors import ConfigError

EXPRESSIONS = [
    "udp port 9999",
    "tcp",
    "icmp",
    "arp",
    "ip6 and udp",
    "vlan 100 and udp",
    "vlan and ip",
    "host 10.0.0.1",
    "src net 10.0.0.0/24 and dst port 53",
    "ether host 02:00:00:00:00:01",
    "ether broadcast",
    "tcp[tcpflags] & tcp-syn != 0",
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420",  # MSH, indexed loads, scratch memory
    "ip[2:2] > 300",
    "len > 200",
    "less 80",
    "ip[6:2] & 0x1fff = 0 and udp",
    "ip[1] * 3 > 100",
    "ip[1] / 3 > 10",
    "ip[1] % 3 = 1",
    "ip[1] ^ 5 = 2",
    "ip[1] - 3 > 100",
    "ip[1] + 3 < 10",
    "ip[1] << 2 > 100",
    "ip[1] > 128 or ip[1] >= 200",  # boundaries: the TOS is often 127, 128, 129, 200
    "ip[1] < 128 and ip[1] <= 127",
    "ip[1] & 0x80 != 0",
    "ip[1] >> 1 = 0",
    "ip[1] | 1 = 1",
    "udp[8:4] = 0x56534532",
    "ip[8] < ip[1]",  # comparisons against X
    "ip[ip[0] & 0xf] != 1",
    "ip6[40] = 58",
    "not udp",
]
MACS = [b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02", b"\xff" * 6]
TOS = [0, 5, 99, 127, 128, 129, 200, 255]
IPS = [b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", b"\x0a\x00\x01\x07"]


def _oracle() -> ctypes.CDLL:
    lib = libpcap()
    lib.bpf_filter.argtypes = (
        ctypes.POINTER(BpfInsn),
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.c_uint,
    )
    lib.bpf_filter.restype = ctypes.c_uint
    return lib


def pcap_returns(program: bytes, frame: bytes, wirelen: int) -> int:
    """What libpcap's interpreter returns for one frame (the reference, one at a time)."""
    insns = ctypes.create_string_buffer(program, len(program))
    ptr = ctypes.cast(insns, ctypes.POINTER(BpfInsn))
    return int(_oracle().bpf_filter(ptr, frame, wirelen, len(frame)))


def pcap_says(program: bytes, frame: bytes, wirelen: int) -> bool:
    """libpcap's verdict on one frame."""
    return pcap_returns(program, frame, wirelen) != 0


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, int]:
    """(captured bytes, length on the wire) of a frame."""
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "arp", "ip6", "raw"]))
    payload = draw(st.binary(max_size=64))
    src, dst = draw(st.sampled_from(IPS)), draw(st.sampled_from(IPS))
    sport, dport = draw(st.sampled_from([53, 9999, 40000])), draw(st.sampled_from([53, 9999]))
    if kind == "raw":
        return draw(st.binary(max_size=120)), 0
    if kind == "arp":
        l3: bytes = bytes(dpkt.arp.ARP(spa=src, tpa=dst))
        eth_type = 0x0806
    elif kind == "ip6":
        udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
        ip6 = dpkt.ip6.IP6(nxt=draw(st.sampled_from([17, 58])), hlim=64, data=udp)
        ip6.plen = len(bytes(udp))
        l3, eth_type = bytes(ip6), 0x86DD
    else:
        if kind == "udp":
            l4: dpkt.Packet = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
            proto = 17
        elif kind == "tcp":
            flags = draw(st.sampled_from([0x02, 0x10, 0x18, 0x11]))
            opts = draw(st.sampled_from([b"", b"\x01\x01\x01\x01"]))
            l4 = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, opts=opts, data=payload)
            l4.off = (20 + len(opts)) // 4
            proto = 6
        else:
            l4, proto = dpkt.icmp.ICMP(type=8, data=payload), 1
        ip = dpkt.ip.IP(
            src=src, dst=dst, p=proto, tos=draw(st.sampled_from(TOS)), data=l4,
            mf=draw(st.sampled_from([0, 1])), offset=draw(st.sampled_from([0, 16])),
        )  # fmt: skip
        l3, eth_type = bytes(ip), 0x0800
    head = draw(st.sampled_from(MACS)) + draw(st.sampled_from(MACS[:2]))
    if draw(st.booleans()):
        head += struct.pack("!HH", 0x8100, draw(st.sampled_from([100, 200])))
    frame = head + struct.pack("!H", eth_type) + l3
    cut = draw(st.integers(0, len(frame)))
    if draw(st.integers(0, 2)) == 0:
        return frame[:cut], len(frame)  # truncated: loads past ``cut`` reject
    return frame, len(frame)


@functools.cache
def program_of(expression: str) -> bytes:
    return compile_filter(expression, 262144)


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(frames(), min_size=1, max_size=30), order=st.randoms())
def test_batch_interpreter_agrees_with_libpcap(
    batch: list[tuple[bytes, int]], order: random.Random
) -> None:
    data = [f for f, _ in batch]
    wire = [max(w, len(f)) for f, w in batch]
    fb = FrameBatch.from_frames(data, origlen=wire)
    rows = np.array(order.sample(range(len(batch)), k=order.randint(1, len(batch))))
    for text in EXPRESSIONS:  # any subset of the rows, in any order
        got = PacketFilter.compile(text).match(fb, rows).tolist()
        want = [pcap_says(program_of(text), data[r], wire[r]) for r in rows.tolist()]
        assert got == want, text


BODY = sorted(c for c in bpf.VALID if c & 7 != bpf.RET)
"""Instructions of a random program's body (it ends with a return of its own)."""
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 14, 31, 32, 33, 0x80, 0x800, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def programs(draw: st.DrawFn) -> bytes:
    """Random programs that ``check_program`` accepts, every instruction class included.

    They start by filling the scratch memory (libpcap's reference leaves it uninitialized).
    """
    body = draw(st.integers(1, 24))
    fill = [(0x00, 0, 0, draw(st.sampled_from(INTERESTING)))] + [(0x02, 0, 0, m) for m in range(16)]
    insns = []
    for pc in range(body):
        left = body - pc - 1  # instructions after this one, the final return excluded
        code = draw(st.sampled_from(BODY))
        cls, op, mode = code & 7, code & 0xF0, code & 0xE0
        k, jt, jf = draw(st.sampled_from(INTERESTING)), 0, 0
        if cls in (bpf.LD, bpf.LDX) and mode in (bpf.ABS, bpf.IND, bpf.MSH):
            k = draw(st.integers(0, 40))
        elif cls in (bpf.ST, bpf.STX) or (mode == bpf.MEM and cls in (bpf.LD, bpf.LDX)):
            k = draw(st.integers(0, 15))
        elif cls == bpf.ALU and code & 8 == 0 and op in (bpf.LSH, bpf.RSH):
            k = draw(st.integers(0, 31))
        elif cls == bpf.ALU and code & 8 == 0 and op in (bpf.DIV, bpf.MOD):
            k = draw(st.sampled_from(INTERESTING[1:]))
        elif cls == bpf.JMP and op == bpf.JA:
            k = draw(st.integers(0, left))
        elif cls == bpf.JMP:
            jt, jf = draw(st.integers(0, left)), draw(st.integers(0, left))
        insns.append((code, jt, jf, k))
    end = draw(st.sampled_from([(0x16, 0, 0, 0), (0x16, 0, 0, 0), (0x06, 0, 0, 1)]))
    return _program(*fill, *insns, end)


@settings(max_examples=300, deadline=None)
@given(program=programs(), batch=st.lists(frames(), min_size=1, max_size=8))
def test_random_programs_agree_with_libpcap(program: bytes, batch: list[tuple[bytes, int]]) -> None:
    data = [f for f, _ in batch]
    wire = [max(w, len(f)) for f, w in batch]
    fb = FrameBatch.from_frames(data, origlen=wire)
    starts, lengths = fb.offset, fb.caplen.astype(np.int64)
    got = run_bpf(check_program(program), fb.data, starts, lengths, fb.origlen.astype(np.int64))
    want = [pcap_returns(program, f, w) for f, w in zip(data, wire, strict=True)]
    assert got.tolist() == want  # the exact return value: every bit of A counts


def test_filters_split_real_frames() -> None:
    """Known frames, known verdicts (the oracle test above is not vacuous)."""
    udp = dpkt.udp.UDP(sport=40000, dport=9999, data=b"VSE2" + bytes(300))
    ip = dpkt.ip.IP(src=IPS[0], dst=IPS[1], p=17, tos=200, data=udp)
    frame = MACS[1] + MACS[0] + b"\x08\x00" + bytes(ip)
    tcp = dpkt.tcp.TCP(sport=53, dport=80, flags=0x02, data=b"GET / HTTP/1.1")
    get = (
        MACS[2]
        + MACS[0]
        + b"\x81\x00\x00\x64\x08\x00"
        + bytes(dpkt.ip.IP(src=IPS[0], dst=IPS[2], p=6, data=tcp))
    )
    fb = FrameBatch.from_frames([frame, get, b"\x00" * 20])
    hits = {t: PacketFilter.compile(t).match(fb, np.arange(3)).tolist() for t in EXPRESSIONS}
    assert hits["udp port 9999"] == [True, False, False]
    assert hits["udp[8:4] = 0x56534532"] == [True, False, False]
    assert hits["vlan and ip"] == [False, True, False]
    assert hits["tcp[tcpflags] & tcp-syn != 0"] == [False, False, False]  # under a VLAN tag
    assert hits["ip[1] * 3 > 100"] == [True, False, False]
    assert hits["ether broadcast"] == [False, True, False]
    assert hits["len > 200"] == [True, False, False]
    assert hits["not udp"] == [False, True, True]


def _program(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("<HBBI", *i) for i in insns)


LD_B_ABS, LDX_IMM, LD_IMM, LDX_MSH = 0x30, 0x01, 0x00, 0xB1
ALU_DIV_X, ALU_MOD_X, ALU_LSH_X, ALU_RSH_X, ALU_NEG = 0x3C, 0x9C, 0x6C, 0x7C, 0x84
JGT_K, JGE_K, JGE_X, JSET_K = 0x25, 0x35, 0x3D, 0x45
RET_A, RET_K, ST, STX, LD_MEM, TXA = 0x16, 0x06, 0x02, 0x03, 0x60, 0x87
LD_LEN, LDX_LEN = 0x80, 0x81
YES, NO, RA = (RET_K, 0, 0, 1), (RET_K, 0, 0, 0), (RET_A, 0, 0, 0)
HAND_WRITTEN = {
    "A / 0": [(LD_IMM, 0, 0, 7), (LDX_IMM, 0, 0, 0), (ALU_DIV_X, 0, 0, 0), YES],
    "A % 0": [(LD_IMM, 0, 0, 7), (LDX_IMM, 0, 0, 0), (ALU_MOD_X, 0, 0, 0), YES],
    "A << 32": [(LD_IMM, 0, 0, 7), (LDX_IMM, 0, 0, 32), (ALU_LSH_X, 0, 0, 0), RA],
    "A >> 33": [(LD_IMM, 0, 0, 7), (LDX_IMM, 0, 0, 33), (ALU_RSH_X, 0, 0, 0), RA],
    "A << 31": [(LD_IMM, 0, 0, 7), (LDX_IMM, 0, 0, 31), (ALU_LSH_X, 0, 0, 0), RA],
    "last byte": [(LD_B_ABS, 0, 0, 13), RA],
    "one past the end": [(LD_B_ABS, 0, 0, 14), YES],
    "MSH of the last byte": [(LDX_MSH, 0, 0, 13), (TXA, 0, 0, 0), RA],
    "MSH past the end": [(LDX_MSH, 0, 0, 14), YES],
    "-0": [(ALU_NEG, 0, 0, 0), RA],
    "-5": [(LD_IMM, 0, 0, 5), (ALU_NEG, 0, 0, 0), RA],
    "7 > 7": [(LD_IMM, 0, 0, 7), (JGT_K, 0, 1, 7), YES, NO],
    "7 >= 7": [(LD_IMM, 0, 0, 7), (JGE_K, 0, 1, 7), YES, NO],
    "7 >= X=7": [(LD_IMM, 0, 0, 7), (LDX_IMM, 0, 0, 7), (JGE_X, 0, 1, 0), YES, NO],
    "7 & 8": [(LD_IMM, 0, 0, 7), (JSET_K, 0, 1, 8), YES, NO],
    "M[3] = X": [(LDX_IMM, 0, 0, 9), (STX, 0, 0, 3), (LD_MEM, 0, 0, 3), RA],
    "M[15] = A": [(LD_IMM, 0, 0, 4), (ST, 0, 0, 15), (LD_IMM, 0, 0, 0), (LD_MEM, 0, 0, 15), RA],
    "len": [(LD_LEN, 0, 0, 0), RA],
    "X = len": [(LDX_LEN, 0, 0, 0), (TXA, 0, 0, 0), RA],
}


@pytest.mark.parametrize("insns", HAND_WRITTEN.values(), ids=HAND_WRITTEN)
def test_hand_written_edge_cases_agree_with_libpcap(insns: list[tuple[int, int, int, int]]) -> None:
    """On a frame of 60 bytes captured to 14."""
    program, frame = _program(*insns), bytes(range(1, 15))
    fb = FrameBatch.from_frames([frame])
    got = run_bpf(check_program(program), fb.data, fb.offset, np.array([14]), np.array([60]))
    assert got.tolist() == [pcap_returns(program, frame, 60)]


@pytest.mark.parametrize(
    ("program", "message"),
    [
        (b"", "1..4096 instructions"),
        (b"\x06\x00" * 3, "1..4096 instructions"),
        (_program((0xFF, 0, 0, 0)), "instruction 0: opcode 0x00ff is not classic BPF"),
        (_program((0x02, 0, 0, 16), (RET_K, 0, 0, 1)), r"M\[16\] out of 0..15"),
        (_program((0x34, 0, 0, 0), (RET_K, 0, 0, 1)), "division by the constant 0"),
        (_program((0x64, 0, 0, 32), (RET_K, 0, 0, 1)), "shift by 32"),
        (_program((0x05, 0, 0, 1), (RET_K, 0, 0, 1)), "instruction 0: jump by 1 leaves"),
        (_program((0x15, 0, 2, 0), (RET_K, 0, 0, 1)), "jump by 2 leaves the program"),
        (_program((LD_B_ABS, 0, 0, 0xFFFFF004), (RET_A, 0, 0, 0)), "ancillary"),
        (_program((LD_IMM, 0, 0, 1)), "instruction 0: a program ends with a return"),
    ],
)
def test_programs_that_do_not_check_are_refused(program: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_program(program)


def test_an_expression_libpcap_rejects_is_a_config_error_with_its_reason() -> None:
    with pytest.raises(ConfigError, match=r"^bpf: bad capture filter 'udp port banana': .*banana"):
        PacketFilter.compile("udp port banana")


def test_the_same_expression_compiles_once() -> None:
    assert PacketFilter.compile("udp port 9999") is PacketFilter.compile("udp port 9999")


def test_no_rows_and_read_only_buffers() -> None:
    filt = PacketFilter.compile("udp")
    fb = FrameBatch.from_frames([bytes(60)])
    assert filt.match(fb, np.zeros(0, np.int64)).tolist() == []
    fb.data.flags.writeable = False
    assert filt.match(fb, np.zeros(1, np.int64)).tolist() == [False]
    bpf.warm_up()
