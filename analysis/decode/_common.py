"""What the stages of the decoding kernel share (private; see ``decode/__init__.py``).

The kernel decodes a batch a chunk of ``CHUNK`` frames at a time, and a chunk stage by stage:
link layer, tag stack, IPv4 or IPv6, IPv6 extension headers, L4. A stage is one loop over the
chunk that decodes the frames whose STEP names it and sets the step that follows.

numba counts references to arrays (atomic operations, which would cost more than the
decoding) wherever it hands an array on: as an argument of a call LLVM does not inline, or
on taking a column out of ``out`` in a loop, when LLVM moves the release away from the
take. So stages are loops, not functions called per frame; they bind the columns they fill
to local names before their loop; and only tiny functions (the readers) are called per
frame with an array.

Stages read frame bytes with the readers below, which take absolute offsets into the batch
buffer. numba does not check bounds: a read past a frame would see the next frame's bytes,
or fault past the buffer; so a stage reads a byte only once it checked it was captured.

``decode._decode`` holds every stage compiled in; ``vspan.kernels.kernel`` keys numba's
cache by a digest of all sources, so an edit of a ``_decode_*`` module alone still
recompiles it.

``out`` in the stages is the output: the decoded columns of a ``Decoded`` (all but those
copied from the batch) as a named tuple with the same field names (numba takes a named
tuple, not a dataclass), so mypy checks its use as a ``Decoded``.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode.columns import Layer, Status
from vspan.kernels import kernel

__all__ = [
    "CAP",
    "CHUNK",
    "DONE",
    "ETHER",
    "IPV4",
    "IPV6",
    "IPV6_EXT",
    "KIND",
    "L4",
    "LENGTH",
    "L_IP",
    "L_IP_EXT",
    "L_L4",
    "L_LINK",
    "L_TAG",
    "L_VLAN",
    "MALFORMED",
    "POS",
    "START",
    "STATE_ROWS",
    "STEP",
    "TRUNCATED",
    "UNSUPPORTED",
    "Frames",
    "State",
    "be16",
    "be32",
    "be48",
    "be64",
    "byte",
    "finish",
    "fold",
    "wrap32",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
State = npt.NDArray[np.int64]
"""The chunk state (see ``STATE_ROWS``)."""


class Frames(NamedTuple):
    """The batch as the kernel reads it: frame ``i`` is ``data[offset[i]:]``, ``caplen[i]``
    bytes of the ``wirelen[i]`` it had on the wire, of link type ``linktype[i]``."""

    data: U8
    offset: I64
    caplen: npt.NDArray[np.int32]
    wirelen: npt.NDArray[np.int32]
    linktype: npt.NDArray[np.uint16]


CHUNK: Final = 1024
"""Frames decoded together: their first bytes stay in the CPU cache from stage to stage."""

STATE_ROWS: Final = 6
START, CAP, STEP, POS, KIND, LENGTH = range(STATE_ROWS)
"""Rows of the chunk state, an int64 ``(STATE_ROWS, CHUNK)`` array set by the stages; column
``j`` is frame ``lo + j``. START: offset of the frame in the batch buffer; CAP: its captured
bytes that lie in the buffer; STEP: the stage that decodes it next; POS: offset in the frame
of the header that stage reads; KIND: what that header is (an EtherType for ``ETHER``, an
IPv6 next header for ``IPV6_EXT``, an IP protocol for ``L4``); LENGTH: the IP payload length
(as the IPv6 header states it for ``IPV6_EXT``, what is left for L4 for ``L4``)."""
DONE, ETHER, IPV4, IPV6, IPV6_EXT, L4 = range(6)
"""STEP values: decoded (or stopped), then the stage that decodes a frame next."""


# ``Status`` and ``Layer`` as plain ints, which numba freezes into the kernels.
TRUNCATED: Final = int(Status.TRUNCATED)
MALFORMED: Final = int(Status.MALFORMED)
UNSUPPORTED: Final = int(Status.UNSUPPORTED)
L_LINK: Final = int(Layer.LINK)
L_TAG: Final = int(Layer.TAG)
L_VLAN: Final = int(Layer.VLAN)
L_IP: Final = int(Layer.IP)
L_IP_EXT: Final = int(Layer.IP_EXT)
L_L4: Final = int(Layer.L4)


_FOLD: Final = np.uint64(0x9E3779B97F4A7C15)
_FINAL1: Final = np.uint64(0xBF58476D1CE4E5B9)
_FINAL2: Final = np.uint64(0x94D049BB133111EB)
_R29, _R31 = np.uint64(29), np.uint64(31)


@kernel
def fold(h: np.uint64, value: int) -> np.uint64:
    """One step of the packet fingerprint's hash: ``value`` (a header word, >= 0) mixed in."""
    h = (h ^ np.uint64(value)) * _FOLD
    return h ^ (h >> _R29)


@kernel
def finish(h: np.uint64) -> np.uint64:
    """The fingerprint of an accumulated hash (splitmix64's finalizer); never 0."""
    h ^= h >> _R31
    h *= _FINAL1
    h ^= h >> _R29
    h *= _FINAL2
    return h | np.uint64(1)


@kernel
def wrap32(x: int) -> int:
    """``x`` wrapped to a signed 32-bit integer, as the int32 columns compute lengths."""
    return ((x + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000


@kernel
def byte(data: U8, at: int) -> int:
    """The byte at ``at`` (>= 0), as a signed int: numba makes floats of mixed signed and
    unsigned ints. (The unsigned index spares the check for a negative one.)"""
    return int(np.int64(data[np.uint64(at)]))


@kernel
def be16(data: U8, at: int) -> int:
    """The big-endian 16-bit field at ``at``."""
    return (byte(data, at) << 8) | byte(data, at + 1)


@kernel
def be32(data: U8, at: int) -> int:
    """The big-endian 32-bit field at ``at``."""
    return (be16(data, at) << 16) | be16(data, at + 2)


@kernel
def be48(data: U8, at: int) -> int:
    """The big-endian 48-bit field at ``at`` (a MAC address, an E-TCI)."""
    return (be32(data, at) << 16) | be16(data, at + 4)


@kernel
def be64(data: U8, at: int) -> np.uint64:
    """The big-endian 64-bit field at ``at`` (half an IPv6 address)."""
    return (np.uint64(be32(data, at)) << np.uint64(32)) | np.uint64(be32(data, at + 4))
