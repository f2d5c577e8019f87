"""The packet socket of one port: its filter, its ring, its counters (private).

``open_tap`` makes an AF_PACKET socket with protocol 0 (it receives nothing yet), asks
for a TPACKET_V3 ring and maps it, attaches the filter, and only then binds to the port
for every protocol, so neither another interface's frames nor unfiltered ones reach the
ring. Constants are those of ``/usr/include/linux/if_packet.h`` (PACKET_*, TPACKET_V3),
``linux/if_ether.h`` (ETH_P_ALL) and ``asm-generic/socket.h`` (SO_ATTACH_FILTER).

Filters: ``vspan.bpf.compile_filter`` (libpcap) compiles the expression into
classic BPF for Ethernet; the program's return value is the snaplen, so the kernel also
cuts frames before they take ring space. ``SO_ATTACH_FILTER`` hands it to the socket as a
``struct sock_fprog`` (``/usr/include/linux/filter.h``: a length and a pointer to
``struct sock_filter``, which is libpcap's 8-byte ``struct bpf_insn``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
from dataclasses import dataclass
from typing import Final

from vspan.bpf import INSN_LEN, BpfInsn, compile_filter
from vspan.collectors.capture._tpacket import TPACKET_REQ3_FIELDS, TPACKET_STATS_V3_FIELDS, Ring
from vspan.errors import VspanError
from vspan.inventory import Port

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


class SockFprog(ctypes.Structure):
    """``struct sock_fprog`` (linux/filter.h)."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(BpfInsn)))


if ctypes.sizeof(SockFprog) != 2 * ctypes.sizeof(ctypes.c_void_p):
    raise ImportError("struct sock_fprog does not match linux/filter.h")


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
