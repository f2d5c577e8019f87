"""Binary layouts declared once, as data: ``(field, numpy type code)`` tables in wire order.

Every fixed-width layout of vspan (the tunnel header and its record table, pcap and pcapng
blocks, TPACKET_V3 headers) is one ``Fields`` table next to its spec; the numpy dtype
(``layout``), the ``struct`` format (``struct_format``) and the field offsets kernels read
(``field_offsets``) are derived from it, so no two of them can disagree.
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = ["Fields", "field_offsets", "layout", "names", "struct_format"]

Fields = tuple[tuple[str, str], ...]
"""``(name, code)`` pairs in wire order; codes ``u1 u2 u4 u8 i4 i8``."""

_STRUCT_CODES: Final = {"u1": "B", "u2": "H", "u4": "I", "i4": "i", "u8": "Q", "i8": "q"}


def layout(fields: Fields, order: str = "<") -> np.dtype[np.void]:
    """The packed numpy dtype of ``fields`` in byte order ``order`` (``<`` or ``>``)."""
    return np.dtype([(name, order + code) for name, code in fields])


def struct_format(fields: Fields, order: str = "<") -> str:
    """The ``struct`` format of ``fields`` in byte order ``order``."""
    return order + "".join(_STRUCT_CODES[code] for _, code in fields)


def field_offsets(fields: Fields) -> dict[str, int]:
    """Byte offset of each field of ``fields``."""
    found = layout(fields).fields
    assert found is not None
    return {name: int(spec[1]) for name, spec in found.items()}


def names(fields: Fields) -> tuple[str, ...]:
    """The field names, in wire order."""
    return tuple(name for name, _ in fields)
