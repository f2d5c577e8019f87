"""Build ``Decoded`` batches column by column for tests of what comes after decoding."""

from __future__ import annotations

from typing import Any

import numpy as np

from vspan.analysis.decode.columns import IPV4_MAPPED_PREFIX, Decoded

_DTYPES = {
    "ts_ns": np.int64,
    "caplen": np.int32,
    "wirelen": np.int32,
    "host": np.uint32,
    "iface": np.int32,
    "status": np.uint8,
    "layer": np.uint8,
    "dst_mac": np.uint64,
    "src_mac": np.uint64,
    "tag_kind": np.uint8,
    "tag_d": np.uint8,
    "tag_p": np.uint8,
    "tag_l": np.uint8,
    "tag_version": np.uint8,
    "dvif": np.uint32,
    "svif": np.uint32,
    "etag_pcp": np.uint8,
    "etag_dei": np.uint8,
    "etag_grp": np.uint8,
    "vlan_depth": np.uint8,
    "vlan_before_tag": np.uint8,
    "vlan_outer": np.int32,
    "vlan_inner": np.int32,
    "vlan_outer_tpid": np.uint16,
    "ethertype": np.uint16,
    "ip_version": np.uint8,
    "src_ip_hi": np.uint64,
    "src_ip_lo": np.uint64,
    "dst_ip_hi": np.uint64,
    "dst_ip_lo": np.uint64,
    "ip_proto": np.uint8,
    "ip_ttl": np.uint8,
    "frag_offset": np.int32,
    "frag_mf": np.uint8,
    "is_fragment": np.uint8,
    "frag_id": np.uint32,
    "l3_offset": np.int32,
    "l4_offset": np.int32,
    "src_port": np.uint16,
    "dst_port": np.uint16,
    "icmp_type": np.uint8,
    "icmp_code": np.uint8,
    "icmp_id": np.uint16,
    "tcp_flags": np.uint16,
    "payload_len": np.int32,
    "fingerprint": np.uint64,
}


def v4(text: str) -> int:
    """An IPv4 address as the low 64 bits of its IPv4-mapped form."""
    a, b, c, d = (int(x) for x in text.split("."))
    return int(IPV4_MAPPED_PREFIX) | (a << 24) | (b << 16) | (c << 8) | d


def decoded(n: int, **cols: Any) -> Decoded:
    """``n`` IPv4 frames, every column defaulted, the given columns broadcast to ``n``."""
    base: dict[str, Any] = {name: np.zeros(n, dtype=dt) for name, dt in _DTYPES.items()}
    base["vlan_outer"][:] = -1
    base["vlan_inner"][:] = -1
    base["ethertype"][:] = 0x0800
    base["ip_version"][:] = 4
    base["l3_offset"][:] = 14
    base["l4_offset"][:] = 34
    base["wirelen"][:] = 60
    base["caplen"][:] = 60
    for name, value in cols.items():
        if name in ("src_ip", "dst_ip"):
            lo = np.array([v4(x) for x in np.broadcast_to(np.asarray(value), (n,))], np.uint64)
            base[f"{name}_lo"] = lo
            continue
        base[name] = np.broadcast_to(np.asarray(value), (n,)).astype(_DTYPES[name]).copy()
    assert set(base) == set(Decoded.column_names())
    return Decoded(**base)
