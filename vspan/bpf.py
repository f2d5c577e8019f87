"""Packet filters: libpcap expressions, compiled by libpcap, run over whole batches.

A SPAN session's ``filter`` and the collector's ``--filter`` are libpcap (tcpdump)
expressions: ``"udp port 9999"``, ``"tcp[tcpflags] & tcp-syn != 0"``, ``"vlan 100 and ip"``.
The collector never parses L3/L4 itself (STYLE.md habit 9): libpcap compiles the expression
into classic BPF for Ethernet, and the program is what looks at the frame.

Two places run such a program:

- the kernel, for the capture-wide ``--filter``: ``compile_filter`` gives the
  ``struct sock_filter`` array that ``_socket.attach_filter`` hands to each port's socket;
- ``PacketFilter.match``, for the sessions' filters: a compiled classic-BPF interpreter
  (``run_bpf``, a numba kernel) runs one program over the selected frames of a batch, with
  no Python per frame. Sessions differ per VM, and a frame captured on one VM's port may be
  wanted by another VM's session (a frame it receives from a local sender is exported at
  the sender's port), so a session's filter is applied where the frame is mirrored, to the
  untagged frame as the VM port saw it (an 802.1Q tag the kernel took off is back in place).

The interpreter follows libpcap's ``bpf_filter`` (pcap/bpf.h opcodes): 32-bit unsigned
arithmetic; a load that reaches past the captured bytes, or a division by zero, rejects the
frame; ``len`` is the length on the wire; a shift by 32 or more gives 0. ``check_program``
validates a program once, before it runs (the opcodes the Linux kernel's checker accepts,
jumps inside the program, scratch memory ``M[0..15]``, a final return), so that the
interpreter always terminates after at most one pass over the instructions. Loads of Linux
ancillary data (offsets from 2^31) are refused: libpcap emits them only for live Linux
handles, never for the dead Ethernet handle used here.

libpcap is loaded through ctypes (``libpcap.so.0.8`` on Debian: no development package).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch
from vspan.errors import ConfigError
from vspan.kernels import kernel

__all__ = [
    "INSN_LEN",
    "MAX_INSNS",
    "BpfInsn",
    "BpfProgram",
    "PacketFilter",
    "check_program",
    "compile_filter",
    "libpcap",
    "run_bpf",
]

I64 = npt.NDArray[np.int64]

DLT_EN10MB: Final = 1
PCAP_NETMASK_UNKNOWN: Final = 0xFFFFFFFF
MAX_INSNS: Final = 4096
"""``BPF_MAXINSNS`` of linux/bpf_common.h."""
MEM_WORDS: Final = 16
"""``BPF_MEMWORDS``: scratch memory M[0..15]."""
_FILTER_SNAPLEN: Final = 262144
"""The return value of a session filter's accepting instructions (only != 0 matters)."""


class BpfInsn(ctypes.Structure):
    """``struct bpf_insn`` (pcap/bpf.h) = ``struct sock_filter`` (linux/filter.h)."""

    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class BpfProgram(ctypes.Structure):
    """``struct bpf_program`` (pcap/bpf.h)."""

    _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(BpfInsn)))


INSN_LEN: Final = ctypes.sizeof(BpfInsn)
if INSN_LEN != 8:
    raise ImportError("struct bpf_insn does not match pcap/bpf.h")
_INSN = np.dtype([("code", "<u2"), ("jt", "u1"), ("jf", "u1"), ("k", "<u4")])

# --- opcodes (pcap/bpf.h, linux/bpf_common.h) --------------------------------------------
# class (code & 0x07), size (& 0x18), mode (& 0xe0), ALU/JMP op (& 0xf0), source (& 0x08)
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = range(0, 0xB0, 0x10)
JA, JEQ, JGT, JGE, JSET = range(0, 0x50, 0x10)
K, X = 0x00, 0x08
RET_A: Final = 0x10
TAX, TXA = 0x00, 0x80
_MASK: Final = 0xFFFFFFFF

VALID: Final = frozenset(
    [LD | W | ABS, LD | H | ABS, LD | B | ABS, LD | W | IND, LD | H | IND, LD | B | IND]
    + [LD | W | LEN, LD | IMM, LD | MEM, LDX | W | IMM, LDX | W | MEM, LDX | W | LEN]
    + [LDX | B | MSH, ST, STX, ALU | NEG, RET | K, RET | RET_A, MISC | TAX, MISC | TXA]
    + [ALU | op | src for op in (ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, MOD, XOR) for src in (K, X)]
    + [JMP | JA]
    + [JMP | op | src for op in (JEQ, JGT, JGE, JSET) for src in (K, X)]
)
"""The opcodes the Linux kernel's classic-BPF checker accepts (and ``run_bpf`` runs)."""


def check_program(program: bytes) -> I64:
    """The instructions of ``program`` (``sock_filter`` after another) as an ``(n, 4)`` array
    of (code, jt, jf, k), once checked; ``ValueError`` saying which instruction is wrong."""
    if not program or len(program) % INSN_LEN or len(program) // INSN_LEN > MAX_INSNS:
        raise ValueError(f"a program has 1..{MAX_INSNS} instructions of 8 bytes")
    raw = np.frombuffer(program, dtype=_INSN)
    insns = np.stack([raw[f].astype(np.int64) for f in ("code", "jt", "jf", "k")], axis=1)
    n = len(insns)
    for pc, (code, jt, jf, k) in enumerate(insns.tolist()):
        cls, op = code & 0x07, code & 0xF0
        problem = None
        if code not in VALID:
            problem = f"opcode {code:#06x} is not classic BPF"
        elif cls in (ST, STX) or (cls in (LD, LDX) and code & 0xE0 == MEM):
            problem = f"scratch memory M[{k}] out of 0..{MEM_WORDS - 1}" if k >= MEM_WORDS else None
        elif cls == LD and code & 0xE0 in (ABS, IND) and k >= 1 << 31:
            problem = f"load at offset {k:#x} (Linux ancillary data) cannot be evaluated"
        elif cls == ALU and code & 0x08 == K and op in (DIV, MOD) and k == 0:
            problem = "division by the constant 0"
        elif cls == ALU and code & 0x08 == K and op in (LSH, RSH) and k >= 32:
            problem = f"shift by {k}"
        elif cls == JMP and op == JA and pc + 1 + k >= n:
            problem = f"jump by {k} leaves the program"
        elif cls == JMP and op != JA and pc + 1 + max(jt, jf) >= n:
            problem = f"jump by {max(jt, jf)} leaves the program"
        if problem is not None:
            raise ValueError(f"instruction {pc}: {problem}")
    if insns[-1, 0] & 0x07 != RET:
        raise ValueError(f"instruction {n - 1}: a program ends with a return")
    return insns


@kernel
def run_bpf(insns: I64, data: npt.NDArray[np.uint8], start: I64, buflen: I64, wirelen: I64
            ) -> I64:  # fmt: skip
    """What the program ``insns`` (checked by ``check_program``) returns for frame ``i``:
    ``buflen[i]`` bytes captured at ``data[start[i]:]``, ``wirelen[i]`` long on the wire.
    0 rejects the frame; libpcap's programs return the snaplen to accept it."""
    n = insns.shape[0]
    out = np.zeros(start.shape[0], np.int64)
    mem = np.zeros(MEM_WORDS, np.int64)
    for i in range(start.shape[0]):
        base, size_in = start[i], buflen[i]
        a, x = np.int64(0), np.int64(0)
        mem[:] = 0
        pc = 0
        while pc < n:
            code, k = insns[pc, 0], insns[pc, 3]
            cls = code & 0x07
            if cls in (LD, LDX):
                mode, size = code & 0xE0, code & 0x18
                if mode in (ABS, IND):
                    at = k if mode == ABS else x + k
                    width = 4 if size == W else 2 if size == H else 1
                    if at + width > size_in:
                        break  # past the captured bytes: rejected
                    v = np.int64(0)
                    for j in range(width):
                        v = (v << 8) | np.int64(data[base + at + j])
                elif mode == MSH:
                    if k >= size_in:
                        break
                    v = (np.int64(data[base + k]) & 0x0F) << 2
                elif mode == IMM:
                    v = k
                elif mode == MEM:
                    v = mem[k]
                else:  # LEN
                    v = wirelen[i]
                if cls == LD:
                    a = v
                else:
                    x = v
            elif cls == ST:
                mem[k] = a
            elif cls == STX:
                mem[k] = x
            elif cls == ALU:
                op = code & 0xF0
                v = k if code & 0x08 == K else x
                if op == ADD:
                    a = a + v
                elif op == SUB:
                    a = a - v
                elif op == MUL:
                    a = a * v  # wraps modulo 2^64: the low 32 bits are right
                elif op in (DIV, MOD):
                    if v == 0:
                        break  # libpcap: the frame is rejected
                    a = a // v if op == DIV else a % v
                elif op == OR:
                    a = a | v
                elif op == AND:
                    a = a & v
                elif op == LSH:
                    a = a << v if v < 32 else np.int64(0)
                elif op == RSH:
                    a = a >> v if v < 32 else np.int64(0)
                elif op == NEG:
                    a = -a
                else:  # XOR
                    a = a ^ v
                a &= _MASK
            elif cls == JMP:
                op = code & 0xF0
                if op == JA:
                    pc += k
                else:
                    v = k if code & 0x08 == K else x
                    if op == JEQ:
                        hit = a == v
                    elif op == JGT:
                        hit = a > v
                    elif op == JGE:
                        hit = a >= v
                    else:  # JSET
                        hit = (a & v) != 0
                    pc += insns[pc, 1] if hit else insns[pc, 2]
            elif cls == RET:
                out[i] = k if code & 0x18 == K else a
                break
            elif code & 0xF8 == TAX:
                x = a
            else:  # TXA
                a = x
            pc += 1
    return out


_PCAP_LOCK = threading.Lock()


@functools.cache
def libpcap() -> ctypes.CDLL:
    """libpcap with the prototypes vspan calls; ``ConfigError`` when it is not installed."""
    name = ctypes.util.find_library("pcap")
    if name is None:
        raise ConfigError("a packet filter needs libpcap (Debian: libpcap0.8)", field="bpf")
    lib = ctypes.CDLL(name)
    lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_compile.argtypes = (
        ctypes.c_void_p,
        ctypes.POINTER(BpfProgram),
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint32,
    )
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_geterr.argtypes = (ctypes.c_void_p,)
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_freecode.argtypes = (ctypes.POINTER(BpfProgram),)
    lib.pcap_freecode.restype = None
    lib.pcap_close.argtypes = (ctypes.c_void_p,)
    lib.pcap_close.restype = None
    return lib


def compile_filter(expression: str, snaplen: int) -> bytes:
    """The classic BPF of ``expression`` for Ethernet frames, ``sock_filter`` after another.

    ``""`` accepts every frame. Accepted frames are cut to ``snaplen`` bytes. A filter
    libpcap rejects raises ``ConfigError`` (field ``bpf``) with libpcap's reason.
    """
    lib = libpcap()
    with _PCAP_LOCK:  # libpcap's compiler is not reentrant before 1.8
        handle = lib.pcap_open_dead(DLT_EN10MB, snaplen)
        if not handle:
            raise ConfigError("libpcap could not open a dead handle", field="bpf")
        try:
            program = BpfProgram()
            if lib.pcap_compile(handle, program, expression.encode(), 1, PCAP_NETMASK_UNKNOWN):
                reason = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
                raise ConfigError(f"bad capture filter {expression!r}: {reason}", field="bpf")
            try:
                return ctypes.string_at(program.bf_insns, program.bf_len * INSN_LEN)
            finally:
                lib.pcap_freecode(program)
        finally:
            lib.pcap_close(handle)


@dataclass(frozen=True, slots=True, eq=False)
class PacketFilter:
    """A libpcap expression compiled and checked once, then run over batches."""

    expression: str
    """The expression as given."""
    insns: I64
    """Its checked program, ``(n, 4)``: code, jt, jf, k."""

    @staticmethod
    def compile(expression: str) -> PacketFilter:
        """Compile ``expression`` (the same object for the same text); ``ConfigError``
        with libpcap's reason if libpcap rejects it."""
        return _compiled(expression)

    def match(self, frames: FrameBatch, rows: I64) -> npt.NDArray[np.bool_]:
        """Whether the filter accepts frame ``rows[i]`` of ``frames`` (Ethernet), per row."""
        if rows.size == 0:
            return np.zeros(0, np.bool_)
        verdict: I64 = run_bpf(
            self.insns,
            frames.data,
            frames.offset[rows].astype(np.int64),
            frames.caplen[rows].astype(np.int64),
            frames.origlen[rows].astype(np.int64),
        )
        return np.not_equal(verdict, 0)


@functools.lru_cache(maxsize=256)
def _compiled(expression: str) -> PacketFilter:
    program = compile_filter(expression, _FILTER_SNAPLEN)
    try:
        insns = check_program(program)
    except ValueError as exc:  # libpcap emitted what the interpreter does not run
        raise ConfigError(f"filter {expression!r} cannot be evaluated: {exc}", field="bpf") from exc
    return PacketFilter(expression, insns)


def warm_up() -> None:
    """Compile ``run_bpf`` for the argument types it is called with (``vspan.aot``)."""
    accept = PacketFilter("", np.array([[RET | K, 0, 0, 1]], np.int64))
    frames = FrameBatch.from_frames([bytes(14)], ts_ns=[0])
    accept.match(frames, np.zeros(1, np.int64))
    frames.data.flags.writeable = False  # a batch over a read-only buffer (a replayed file)
    accept.match(frames, np.zeros(1, np.int64))
