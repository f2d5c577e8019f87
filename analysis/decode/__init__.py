"""The frame decoder: a ``FrameBatch`` in, a ``Decoded`` out.

``decode_batch`` allocates the columns with numpy and fills them in one call of a compiled
kernel (numba, the GIL released) that decodes the batch a chunk of frames at a time, each
chunk in stages: link layer and tag stack (``decode._link``), IPv4 or IPv6 and IPv6
extension headers (``decode._ip``), then TCP, UDP, SCTP, ICMP or ICMPv6 (``decode._l4``).
Each stage is a loop over the frames of the chunk (``decode._common`` says why); it reads
only bytes it checked were captured, and writes only the columns it decodes: the others
keep 0 or their sentinel.

Semantics follow what tshark 4.0 shows for the same bytes (``tests/analysis/
test_decode_tshark.py`` checks it); where they differ on purpose it is said here:

* A frame whose captured bytes end inside a header is TRUNCATED at that layer, even when the
  wire length is as short (tshark calls a header cut by the *wire* end malformed).
* Each field of a cut header is filled when its bytes were captured (tshark often reads on
  before it shows a field: MACs, IPv4 destination, TCP flags, SCTP ports, ICMP type); fields
  of earlier layers stay filled; ``ip_version`` is set once a valid version nibble is read.
* More than ``MAX_STACK`` stacked tags, or a second VN-Tag/E-TAG, is MALFORMED (tshark
  decodes on); an inconsistent UDP length is not (tshark says it is): the IP payload stands
  in for it. Only the 8-byte ICMP header and the 12-byte SCTP common header are decoded.
* Link types NULL and RAW have no MACs (``NO_MAC``); their ``ethertype`` is that of the IP
  version found. Linux cooked captures (SLL, SLL2) carry the sender's address only; vspan
  reads neither MAC from them (``NO_MAC``), so that both directions of a conversation keep
  one flow key.
* ``fingerprint`` is vspan's own (``columns.Decoded.fingerprint``): tshark has no such field.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode._common import CHUNK, STATE_ROWS, U8, Frames, finish
from vspan.analysis.decode._ip import ipv4_headers, ipv6_extensions, ipv6_headers
from vspan.analysis.decode._l4 import l4_headers
from vspan.analysis.decode._link import MAX_STACK, link_layers, tag_stacks
from vspan.analysis.decode.columns import NO_MAC, Decoded
from vspan.batch import FrameBatch
from vspan.kernels import kernel, literal_unroll

__all__ = ["MAX_STACK", "decode_batch"]

_DTYPE_OF_ALIAS: Final = {
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "I32": np.int32,
    "I64": np.int64,
}
_COLUMN_DTYPES: Final = {f.name: _DTYPE_OF_ALIAS[str(f.type)] for f in fields(Decoded)}
"""Column name to dtype, from the annotations of ``Decoded`` (a new alias fails here)."""
_PASSED: Final = ("ts_ns", "caplen", "wirelen", "host", "iface")
"""Columns copied from the batch."""

_named_tuple: Callable[..., Any] = namedtuple
_Decoded = _named_tuple("_Decoded", [n for n in Decoded.column_names() if n not in _PASSED])
"""The columns the kernel fills, as a named tuple (the form in which numba takes them)."""


def decode_batch(batch: FrameBatch) -> Decoded:
    """Decode every frame of ``batch``; never raises on any frame bytes (see ``Status``)."""
    n = len(batch)
    linktype = np.ascontiguousarray(batch.linktype, np.uint16)
    if linktype.shape != (n,):
        raise ValueError(f"{n} frames but {linktype.size} link types")
    cols = {name: np.empty(n, dtype) for name, dtype in _COLUMN_DTYPES.items()}
    cols["ts_ns"][:] = batch.ts_ns
    cols["caplen"][:] = batch.caplen
    cols["wirelen"][:] = batch.origlen
    cols["host"][:] = batch.host_column()
    cols["iface"][:] = batch.iface_column()
    frames = Frames(
        data=np.ascontiguousarray(batch.data, np.uint8).reshape(-1),
        offset=np.ascontiguousarray(batch.offset, np.int64),
        caplen=cols["caplen"],
        wirelen=cols["wirelen"],
        linktype=linktype,
    )
    _decode(frames, _Decoded(**{name: cols[name] for name in _Decoded._fields}))
    return Decoded(**cols)


@kernel
def _decode(fr: Frames, out: Any) -> None:
    """Decode frame ``i`` of ``fr`` into row ``i`` of ``out``, the named tuple of the columns
    to fill (a ``Decoded`` to the stages, a tuple to ``literal_unroll``)."""
    n = fr.offset.shape[0]
    st = np.empty((STATE_ROWS, min(n, CHUNK)), np.int64)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        for column in literal_unroll(out):
            column[lo:hi] = 0
        for absent in (out.vlan_outer, out.vlan_inner, out.l3_offset, out.l4_offset):
            absent[lo:hi] = -1
        out.dst_mac[lo:hi] = NO_MAC
        out.src_mac[lo:hi] = NO_MAC
        st[0, 0] = _touch(lo, hi, fr.data, fr.offset)  # overwritten by link_layers
        link_layers(lo, hi, fr, out, st)
        tag_stacks(lo, hi, fr, out, st)
        ipv4_headers(lo, hi, fr, out, st)
        ipv6_headers(lo, hi, fr, out, st)
        ipv6_extensions(lo, hi, fr, out, st)
        l4_headers(lo, hi, fr, out, st)
        _finish_fingerprints(lo, hi, out.fingerprint)


@kernel
def _finish_fingerprints(lo: int, hi: int, fingerprint: npt.NDArray[np.uint64]) -> None:
    """Finalize the hashes the stages accumulated (0 stays 0: no identity)."""
    for i in range(lo, hi):
        if fingerprint[i] != 0:
            fingerprint[i] = finish(fingerprint[i])


@kernel
def _touch(lo: int, hi: int, data: U8, offset: npt.NDArray[np.int64]) -> int:
    """Read the first 64 bytes of frames ``lo .. hi`` (their one or two cache lines), all at
    once: the stages then find them in the cache. (The sum keeps the reads from being
    optimized away.)"""
    total = 0
    last = data.shape[0] - 1
    for i in range(lo, hi if last >= 0 else lo):
        s = min(max(offset[i], 0), last)
        total += data[np.uint64(s)] + data[np.uint64(min(s + 63, last))]
    return total
