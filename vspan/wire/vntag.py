"""VN-Tag (EtherType 0x8926) and IEEE 802.1BR E-TAG (EtherType 0x893F) codecs.

Sans-I/O: bytes in, frozen dataclasses (one tag) or numpy columns (many tags) out, and the
exact reverse. Bit layouts are those of ``spec/vntag.md``, i.e. as Wireshark 2.6+ dissects
them; the field tables below are in wire order, most significant bit first, and are checked
at import to fill their carrier exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.errors import TruncatedError

__all__ = [
    "ETAG_FIELDS",
    "ETAG_LAYOUT",
    "ETAG_LEN",
    "VNTAG_FIELDS",
    "VNTAG_LAYOUT",
    "VNTAG_LEN",
    "ETag",
    "EtherType",
    "VnTag",
    "VnTagColumns",
    "decode_etag",
    "decode_vntag",
    "decode_vntag_array",
    "encode_etag",
    "encode_vntag",
    "encode_vntag_array",
]


class EtherType(IntEnum):
    """EtherTypes vspan dispatches on."""

    IPV4 = 0x0800
    ARP = 0x0806
    DOT1Q = 0x8100
    IPV6 = 0x86DD
    DOT1AD = 0x88A8
    VNTAG = 0x8926
    ETAG = 0x893F
    QINQ_9100 = 0x9100


VNTAG_LEN: Final = 4
"""Bytes of the VN-Tag after its EtherType (the inner EtherType follows)."""
ETAG_LEN: Final = 6
"""Bytes of the E-TCI after its EtherType (the inner EtherType follows)."""

# spec/vntag.md, "VN-Tag — EtherType 0x8926": (field, bits) in wire order.
VNTAG_FIELDS: Final[tuple[tuple[str, int], ...]] = (
    ("d", 1),
    ("p", 1),
    ("dvif", 14),
    ("l", 1),
    ("r", 1),
    ("version", 2),
    ("svif", 12),
)

# spec/vntag.md, "802.1BR E-TAG — EtherType 0x893F": (field, bits) in wire order.
ETAG_FIELDS: Final[tuple[tuple[str, int], ...]] = (
    ("pcp", 3),
    ("dei", 1),
    ("iecid_base", 12),
    ("resv", 2),
    ("grp", 2),
    ("ecid_base", 12),
    ("iecid_ext", 8),
    ("ecid_ext", 8),
)


def _layout(fields: tuple[tuple[str, int], ...], carrier_bits: int) -> dict[str, tuple[int, int]]:
    """Map each field to (shift, mask) and check the widths fill the carrier."""
    total = sum(bits for _, bits in fields)
    if total != carrier_bits:  # pragma: no cover - a bug in the table above
        raise AssertionError(f"fields cover {total} bits, carrier has {carrier_bits}")
    out: dict[str, tuple[int, int]] = {}
    shift = carrier_bits
    for name, bits in fields:
        shift -= bits
        out[name] = (shift, (1 << bits) - 1)
    return out


VNTAG_LAYOUT: Final = _layout(VNTAG_FIELDS, VNTAG_LEN * 8)
"""(shift, mask) of each VN-Tag field in the 48-bit tag."""
ETAG_LAYOUT: Final = _layout(ETAG_FIELDS, ETAG_LEN * 8)
"""(shift, mask) of each E-TAG field in the 64-bit tag."""


@dataclass(frozen=True, slots=True)
class VnTag:
    """One VN-Tag."""

    d: int = 0
    """Direction: 0 "to bridge" (a VM sent it), 1 "from bridge" (delivered to a VM)."""
    p: int = 0
    """Pointer: 1 when ``dvif`` names a vif list (multicast) rather than one vif."""
    dvif: int = 0
    """Destination virtual interface (14 bits); 0 is "not a local VM"."""
    l: int = 0  # noqa: E741 - the spec's name
    """Looped: the frame returns to the port it came from."""
    r: int = 0
    """Reserved, 0 on send; kept so that encode is the exact inverse of decode."""
    version: int = 0
    """Tag version (2 bits), 0."""
    svif: int = 0
    """Source virtual interface (12 bits); 0 is "not a local VM" (the uplink)."""
    ethertype: int = 0
    """The inner EtherType (or 802.3 length when at most 1500) after the tag."""

    def __post_init__(self) -> None:
        for name, (_, mask) in VNTAG_LAYOUT.items():
            value = getattr(self, name)
            if not 0 <= value <= mask:
                raise ValueError(f"VN-Tag field {name}={value} out of range 0..{mask}")
        if not 0 <= self.ethertype <= 0xFFFF:
            raise ValueError(f"VN-Tag inner EtherType {self.ethertype} out of range 0..65535")


@dataclass(frozen=True, slots=True)
class ETag:
    """One IEEE 802.1BR E-TAG."""

    pcp: int = 0
    """E-PCP, priority (3 bits)."""
    dei: int = 0
    """E-DEI, drop eligible (1 bit)."""
    iecid: int = 0
    """Ingress E-CID (20 bits: ext << 12 | base); the role of the VN-Tag's svif."""
    resv: int = 0
    """Reserved (2 bits)."""
    grp: int = 0
    """GRP (2 bits): 0 for a single E-CID, else a multicast group."""
    ecid: int = 0
    """E-CID (20 bits: ext << 12 | base); the role of the VN-Tag's dvif."""
    ethertype: int = 0
    """The inner EtherType after the tag."""

    def __post_init__(self) -> None:
        limits = {
            "pcp": 7,
            "dei": 1,
            "iecid": 0xFFFFF,
            "resv": 3,
            "grp": 3,
            "ecid": 0xFFFFF,
            "ethertype": 0xFFFF,
        }
        for name, top in limits.items():
            value = getattr(self, name)
            if not 0 <= value <= top:
                raise ValueError(f"E-TAG field {name}={value} out of range 0..{top}")


def _need(data: bytes | memoryview, offset: int, need: int, what: str) -> None:
    got = len(data) - offset
    if offset < 0 or got < need:
        raise TruncatedError(
            f"{what} truncated at offset {offset}: need {need} bytes, got {max(got, 0)}"
        )


def decode_vntag(data: bytes | memoryview, offset: int = 0) -> VnTag:
    """Decode the 4-byte VN-Tag and the inner EtherType at ``offset`` (just after 0x8926)."""
    _need(data, offset, VNTAG_LEN + 2, "VN-Tag")
    word, ethertype = struct.unpack_from("!IH", data, offset)
    values = {name: (word >> shift) & mask for name, (shift, mask) in VNTAG_LAYOUT.items()}
    return VnTag(ethertype=ethertype, **values)


def encode_vntag(tag: VnTag) -> bytes:
    """The 6 bytes of ``tag``: the 4-byte tag and the inner EtherType."""
    word = 0
    for name, (shift, _) in VNTAG_LAYOUT.items():
        word |= getattr(tag, name) << shift
    return struct.pack("!IH", word, tag.ethertype)


def decode_etag(data: bytes | memoryview, offset: int = 0) -> ETag:
    """Decode the 6-byte E-TCI and the inner EtherType at ``offset`` (just after 0x893F)."""
    _need(data, offset, ETAG_LEN + 2, "E-TAG")
    hi, lo, ethertype = struct.unpack_from("!IHH", data, offset)
    word = (hi << 16) | lo
    f = {name: (word >> shift) & mask for name, (shift, mask) in ETAG_LAYOUT.items()}
    return ETag(
        pcp=f["pcp"],
        dei=f["dei"],
        resv=f["resv"],
        grp=f["grp"],
        iecid=(f["iecid_ext"] << 12) | f["iecid_base"],
        ecid=(f["ecid_ext"] << 12) | f["ecid_base"],
        ethertype=ethertype,
    )


def encode_etag(tag: ETag) -> bytes:
    """The 8 bytes of ``tag``: the 6-byte E-TCI and the inner EtherType."""
    parts = {
        "pcp": tag.pcp,
        "dei": tag.dei,
        "resv": tag.resv,
        "grp": tag.grp,
        "iecid_base": tag.iecid & 0xFFF,
        "iecid_ext": tag.iecid >> 12,
        "ecid_base": tag.ecid & 0xFFF,
        "ecid_ext": tag.ecid >> 12,
    }
    word = 0
    for name, (shift, _) in ETAG_LAYOUT.items():
        word |= parts[name] << shift
    return struct.pack("!IHH", word >> 16, word & 0xFFFF, tag.ethertype)


# --- vectorized -------------------------------------------------------------------------

U32 = npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True, eq=False)
class VnTagColumns:
    """Many VN-Tags as equal-length columns (``uint8`` for flags, ``uint16`` for vifs)."""

    d: npt.NDArray[np.uint8]
    p: npt.NDArray[np.uint8]
    dvif: npt.NDArray[np.uint16]
    l: npt.NDArray[np.uint8]  # noqa: E741 - the spec's name
    r: npt.NDArray[np.uint8]
    version: npt.NDArray[np.uint8]
    svif: npt.NDArray[np.uint16]


def _field(words: U32, name: str) -> U32:
    shift, mask = VNTAG_LAYOUT[name]
    return (words >> np.uint32(shift)) & np.uint32(mask)


def decode_vntag_array(words: U32) -> VnTagColumns:
    """Split 32-bit tag words (host order, as read big-endian) into field columns."""
    w = np.asarray(words, dtype=np.uint32)
    return VnTagColumns(
        d=_field(w, "d").astype(np.uint8),
        p=_field(w, "p").astype(np.uint8),
        dvif=_field(w, "dvif").astype(np.uint16),
        l=_field(w, "l").astype(np.uint8),
        r=_field(w, "r").astype(np.uint8),
        version=_field(w, "version").astype(np.uint8),
        svif=_field(w, "svif").astype(np.uint16),
    )


def encode_vntag_array(
    *,
    svif: npt.ArrayLike,
    dvif: npt.ArrayLike,
    d: npt.ArrayLike = 0,
    p: npt.ArrayLike = 0,
    l: npt.ArrayLike = 0,  # noqa: E741 - the spec's name
    r: npt.ArrayLike = 0,
    version: npt.ArrayLike = 0,
) -> U32:
    """Pack field columns (broadcast together) into 32-bit tag words.

    Raises ``ValueError`` when a value does not fit its field.
    """
    given = {"d": d, "p": p, "dvif": dvif, "l": l, "r": r, "version": version, "svif": svif}
    arrays = np.broadcast_arrays(*(np.asarray(v, dtype=np.int64) for v in given.values()))
    word = np.zeros(arrays[0].shape, dtype=np.uint32)
    for name, values in zip(given, arrays, strict=True):
        shift, mask = VNTAG_LAYOUT[name]
        if values.size and (values.min() < 0 or values.max() > mask):
            raise ValueError(f"VN-Tag field {name} out of range 0..{mask}")
        word |= values.astype(np.uint32) << np.uint32(shift)
    return word
