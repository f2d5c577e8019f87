"""One layout table gives the numpy dtype, the struct format and the offsets, and they agree."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vspan.fields import Fields, field_offsets, layout, names, struct_format
from vspan.wire.tunnel import HEADER, HEADER_DTYPE, HEADER_LAYOUT, MAGIC, VERSION

CODES = {"u1": 1, "u2": 2, "u4": 4, "u8": 8, "i4": 4, "i8": 8}


@st.composite
def tables(draw: st.DrawFn) -> tuple[Fields, list[int]]:
    codes = draw(st.lists(st.sampled_from(sorted(CODES)), min_size=1, max_size=12))
    fields = tuple((f"f{i}", c) for i, c in enumerate(codes))
    values = []
    for c in codes:
        bits = CODES[c] * 8
        lo, hi = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if c[0] == "i" else (0, (1 << bits) - 1)
        )
        values.append(draw(st.integers(lo, hi)))
    return fields, values


@given(tables(), st.sampled_from("<>"))
def test_the_struct_and_the_dtype_of_a_table_read_the_same_bytes(
    table: tuple[Fields, list[int]], order: str
) -> None:
    fields, values = table
    data = struct.pack(struct_format(fields, order), *values)
    row = np.frombuffer(data, dtype=layout(fields, order))[0]
    assert [int(row[name]) for name in names(fields)] == values
    offsets = field_offsets(fields)
    for (name, code), value in zip(fields, values, strict=True):
        one = struct.unpack_from(order + struct_format(((name, code),))[1:], data, offsets[name])
        assert one == (value,)


def test_the_tunnel_header_is_one_table() -> None:
    # spec/tunnel.md: magic 0x5653, version 1, then flags, length, ids, seq, count; 24 bytes.
    data = HEADER.pack(MAGIC, VERSION, 1, 100, 7, 8, 9, 3, 0)
    assert data[:3] == b"\x56\x53\x01"
    assert len(data) == 24 == HEADER_DTYPE.itemsize
    row = np.frombuffer(data, HEADER_DTYPE)[0]
    assert [int(row[n]) for n, _ in HEADER_LAYOUT] == [MAGIC, VERSION, 1, 100, 7, 8, 9, 3, 0]
