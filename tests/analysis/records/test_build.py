"""Flow records: addresses as text, against Python's ``ipaddress`` (RFC 5952)."""

from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.records.build import _ip_strings, _ip_text

MAPPED = st.integers(0, 2**32 - 1).map(lambda v: 0xFFFF << 32 | v)
ADDRESS = st.one_of(
    MAPPED,
    st.integers(0, 2**32 - 1),  # IPv4-compatible (deprecated): printed as IPv6
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**64 - 1).map(lambda v: v << 64),
    st.just(0),
)


def _signed(word: int) -> int:
    """A 64-bit word as the int64 flow columns hold it."""
    return word - (1 << 64) if word >> 63 else word


def _oracle(value: int) -> str | None:
    if value == 0:
        return None
    addr = ipaddress.IPv6Address(value)
    return str(addr.ipv4_mapped or addr)


@given(ADDRESS)
def test_an_address_prints_as_ipaddress_does(value: int) -> None:
    assert _ip_text(_signed(value >> 64), _signed(value & (2**64 - 1))) == _oracle(value)


@settings(deadline=None)  # the first call may compile the factorize kernel
@given(st.lists(st.tuples(ADDRESS, ADDRESS), max_size=20))
def test_both_sides_share_one_table(pairs: list[tuple[int, int]]) -> None:
    def words(values: list[int]) -> tuple[np.ndarray, np.ndarray]:
        hi = np.array([_signed(v >> 64) for v in values], np.int64)
        lo = np.array([_signed(v & (2**64 - 1)) for v in values], np.int64)
        return hi, lo

    src, dst = [p[0] for p in pairs], [p[1] for p in pairs]
    src_text, dst_text = _ip_strings(words(src), words(dst))
    assert src_text.values is dst_text.values
    assert [src_text.values[c] for c in src_text.codes] == [_oracle(v) for v in src]
    assert [dst_text.values[c] for c in dst_text.codes] == [_oracle(v) for v in dst]
