"""The packet socket of one port: its filter, its ring, its counters (private).

``open_tap`` makes an AF_PACKET socket with protocol 0 (it receives nothing yet), asks
for a TPACKET_V3 ring and maps it, attaches the filter, and only then binds to the port
for every protocol, so neither another interface's frames nor unfiltered ones reach the
ring. Constants are those of ``/usr/include/linux/if_packet.h`` (PACKET_*, TPACKET_V3),
``linux/if_ether.h`` (ETH_P_ALL) and ``asm-generic/socket.h`` (SO_ATTACH_FILTER).

Filters: libpcap, loaded through ctypes (``libpcap.so.0.8`` on Debian: no development
package needed), compiles the expression with ``pcap_open_dead`` + ``pcap_compile`` into
classic BPF for Ethernet; the program's return value is the snaplen, so the kernel also
cuts frames before they take ring space. ``SO_ATTACH_FILTER`` hands it to the socket as a
``struct sock_fprog``. Layouts: ``struct bpf_insn``/``bpf_program`` of ``pcap/bpf.h``,
``struct sock_filter``/``sock_fprog`` of ``/usr/include/linux/filter.h`` (``sock_filter``
is ``bpf_insn``, 8 bytes; ``sock_fprog`` is a length and a pointer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Final

from vspan.collectors._tpacket import TPACKET_REQ3_FIELDS, TPACKET_STATS_V3_FIELDS, Ring
from vspan.collectors.model import Port
from vspan.errors import ConfigError, VspanError

__all__ = [
    "MAX_SNAPLEN",
    "PACKET_OUTGOING",
    "CaptureError",
    "CapturePermissionError",
    "Geometry",
    "NoSuchInterfaceError",
    "Tap",
    "attach_filter",
    "compile_filter",
    "open_tap",
]

SOL_PACKET: Final = 263
PACKET_RX_RING: Final = 5
PACKET_STATISTICS: Final = 6
PACKET_VERSION: Final = 10
TPACKET_V3: Final = 2
PACKET_OUTGOING: Final = 4
ETH_P_ALL: Final = 0x0003
MAX_SNAPLEN: Final = 262144
_REQ3 = struct.Struct("=" + "I" * len(TPACKET_REQ3_FIELDS))
_STATS3 = struct.Struct("=" + "I" * len(TPACKET_STATS_V3_FIELDS))
SO_ATTACH_FILTER: Final = 26
DLT_EN10MB: Final = 1
PCAP_NETMASK_UNKNOWN: Final = 0xFFFFFFFF


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


class SockFprog(ctypes.Structure):
    """``struct sock_fprog`` (linux/filter.h)."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(BpfInsn)))


INSN_LEN: Final = ctypes.sizeof(BpfInsn)
if INSN_LEN != 8 or ctypes.sizeof(SockFprog) != 2 * ctypes.sizeof(ctypes.c_void_p):
    raise ImportError("struct sock_filter/sock_fprog do not match linux/filter.h")


@functools.cache
def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap")
    if name is None:
        raise ConfigError("a capture filter needs libpcap (libpcap0.8)", field="bpf")
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


_LOCK = threading.Lock()


def compile_filter(expression: str, snaplen: int) -> bytes:
    """The classic BPF of ``expression`` for Ethernet frames, ``sock_filter`` after another.

    ``""`` accepts every frame. Accepted frames are cut to ``snaplen`` bytes. A filter
    libpcap rejects raises ``ConfigError`` with libpcap's reason.
    """
    lib = _libpcap()
    with _LOCK:  # libpcap's compiler is not reentrant before 1.8
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


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Run ``program`` (from ``compile_filter``) on ``sock``; the kernel keeps a copy."""
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // INSN_LEN, ctypes.cast(insns, ctypes.POINTER(BpfInsn)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


class CaptureError(VspanError):
    """Live capture cannot run on a port."""


class NoSuchInterfaceError(CaptureError):
    """The port's interface does not exist (in the caller's network namespace)."""


class CapturePermissionError(CaptureError):
    """Opening a packet socket needs root or CAP_NET_RAW."""


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of a ring (``struct tpacket_req3``); see ``AfPacketConfig``."""

    block_size: int
    block_count: int
    frame_size: int
    block_timeout_ms: int


class Tap:
    """One port's socket and ring, and how many frames sampling has seen."""

    def __init__(self, port: Port, sock: socket.socket, ring: Ring) -> None:
        self.port = port
        self.sock = sock
        self.ring = ring
        self.seen = 0

    def kernel_drops(self) -> int:
        """Drops since the last call (PACKET_STATISTICS resets on read)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS3.size)
        return int(_STATS3.unpack(raw)[1])

    def close(self) -> None:
        self.ring.close()
        self.sock.close()


def open_tap(port: Port, geometry: Geometry, program: bytes | None) -> Tap:
    """A packet socket bound to ``port`` with its ring mapped and filter attached."""
    name = port.name
    try:  # names resolve in the calling thread's network namespace
        socket.if_nametoindex(name)
    except OSError as exc:
        raise NoSuchInterfaceError(f"no such interface: {name}") from exc
    try:  # protocol 0: receive nothing until bound, so no other interface's frames
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError as exc:
        raise CapturePermissionError(f"capturing on {name} needs root or CAP_NET_RAW") from exc
    ring: Ring | None = None
    try:
        size = geometry.block_size * geometry.block_count
        frames = size // geometry.frame_size
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        req = (geometry.block_size, geometry.block_count, geometry.frame_size, frames)
        sock.setsockopt(
            SOL_PACKET, PACKET_RX_RING, _REQ3.pack(*req, geometry.block_timeout_ms, 0, 0)
        )
        ring = Ring(mmap.mmap(sock.fileno(), size), geometry.block_size, geometry.block_count)
        if program is not None:
            attach_filter(sock, program)
        sock.bind((name, ETH_P_ALL))
        sock.setblocking(False)
    except OSError as exc:
        if ring is not None:
            ring.close()
        sock.close()
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise NoSuchInterfaceError(f"no such interface: {name}") from exc
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise CapturePermissionError(f"capturing on {name} needs root or CAP_NET_RAW") from exc
        raise CaptureError(f"cannot capture on {name}: {exc.strerror or exc}") from exc
    return Tap(port, sock, ring)
