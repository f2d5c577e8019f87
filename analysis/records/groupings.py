"""Groupings of flow records for reports: by VM, VM pair, host pair and protocol.

Each grouping is a vectorized pandas ``groupby`` over flow records; every output row has its
grouping keys plus ``packets``, ``bytes`` (both directions) and ``flows``.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pandas as pd

from vspan.analysis.records.options import GROUPINGS

__all__ = ["GROUPINGS", "group_flows"]


PROTOCOL_NAMES: Final = {
    1: "ICMP",
    2: "IGMP",
    6: "TCP",
    17: "UDP",
    47: "GRE",
    50: "ESP",
    51: "AH",
    58: "ICMPv6",
    89: "OSPF",
    112: "VRRP",
    132: "SCTP",
}
_ETHERTYPE_NAMES: Final = {0x0806: "ARP", 0: "802.3/LLC", 0x88CC: "LLDP", 0x8035: "RARP"}


def _label(records: pd.DataFrame, side: str) -> pd.Series:
    """A VM's name, else the endpoint's IP address, else its MAC."""
    return records[f"{side}_vm"].fillna(records[f"{side}_ip"]).fillna(records[f"{side}_mac"])


def _totals(records: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "packets": records["packets"] + records["packets_rev"],
            "bytes": records["bytes"] + records["bytes_rev"],
            "flows": np.ones(len(records), dtype=np.int64),
        }
    )


def _sum(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.groupby(keys, as_index=False, dropna=False).sum(numeric_only=True)


def _by_vm(records: pd.DataFrame) -> pd.DataFrame:
    sides = []
    for side, sent, received in (("src", "", "_rev"), ("dst", "_rev", "")):
        sides.append(
            pd.DataFrame(
                {
                    "vm": _label(records, side),
                    "host": records[f"{side}_host"],
                    "packets_sent": records["packets" + sent],
                    "bytes_sent": records["bytes" + sent],
                    "packets_received": records["packets" + received],
                    "bytes_received": records["bytes" + received],
                    "flows": np.ones(len(records), dtype=np.int64),
                }
            )
        )
    both = pd.concat(sides, ignore_index=True)
    both["packets"] = both["packets_sent"] + both["packets_received"]
    both["bytes"] = both["bytes_sent"] + both["bytes_received"]
    out = _sum(both, ["vm", "host"])
    return out[
        [
            "vm",
            "host",
            "packets",
            "bytes",
            "flows",
            "packets_sent",
            "bytes_sent",
            "packets_received",
            "bytes_received",
        ]
    ]


def _pair(a: pd.Series, b: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The two names of an unordered pair, smaller first (None sorts as "")."""
    sa, sb = a.fillna("").astype(str), b.fillna("").astype(str)
    swap = sa > sb
    return a.where(~swap, b), b.where(~swap, a)


def _by_vm_pair(records: pd.DataFrame) -> pd.DataFrame:
    a, b = _pair(_label(records, "src"), _label(records, "dst"))
    frame = pd.concat(
        [pd.DataFrame({"vm_a": a, "vm_b": b, "scope": records["scope"]}), _totals(records)], axis=1
    )
    return _sum(frame, ["vm_a", "vm_b", "scope"])


def _by_host_pair(records: pd.DataFrame) -> pd.DataFrame:
    a, b = _pair(records["src_host"].fillna("external"), records["dst_host"].fillna("external"))
    frame = pd.concat(
        [pd.DataFrame({"host_a": a, "host_b": b, "scope": records["scope"]}), _totals(records)],
        axis=1,
    )
    return _sum(frame, ["host_a", "host_b", "scope"])


def _by_protocol(records: pd.DataFrame) -> pd.DataFrame:
    proto = records["proto"]
    names = proto.map(lambda p: PROTOCOL_NAMES.get(int(p), str(int(p))), na_action="ignore")
    et_names = records["ethertype"].map(lambda e: _ETHERTYPE_NAMES.get(int(e), f"0x{int(e):04x}"))
    frame = pd.concat(
        [pd.DataFrame({"proto": proto, "name": names.fillna(et_names)}), _totals(records)], axis=1
    )
    return _sum(frame, ["proto", "name"])


def group_flows(records: pd.DataFrame, by: str) -> pd.DataFrame:
    """Flow records grouped ``by`` one of ``GROUPINGS`` ("flow" returns them as they are)."""
    if by == "flow":
        return records
    table = {
        "vm": _by_vm,
        "vm-pair": _by_vm_pair,
        "host-pair": _by_host_pair,
        "protocol": _by_protocol,
    }
    if by not in table:
        raise ValueError(f"unknown grouping {by!r}; expected one of {', '.join(GROUPINGS)}")
    return table[by](records).reset_index(drop=True)
