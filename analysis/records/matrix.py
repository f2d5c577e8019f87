"""Traffic matrices: flow records → time-binned VM-pair and host-pair matrices, the
intra-/cross-host split, and each host's uplink load.

A flow's counters are spread over the bins ``[k·bin, (k+1)·bin)`` it spans, in proportion to
its time overlap with each bin (a flow with ``first_ns == last_ns`` falls whole into its bin),
so the sum over bins of every counter equals the flow's counter. Everything is vectorized:
one ``np.repeat`` row per (flow, bin), then a ``groupby``.

Matrices are **directed**: a flow contributes ``bytes``/``packets`` to ``src → dst`` and
``bytes_rev``/``packets_rev`` to ``dst → src``; ``flows`` counts the flows active in the bin
under their initiator's direction (0 on the reverse row). An end that is no known VM is named
``?@HOST`` when its host is known, else ``EXTERNAL``; an end with no host is ``EXTERNAL``.

Classes of a directed host pair: ``intra-host`` (same host), ``cross-host`` (two hosts: on the
wire), ``external`` (one end outside every host). A host's **uplink** carries its cross-host
and external traffic: ``out`` leaves the host, ``in`` enters it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "EXTERNAL",
    "MATRIX_COLUMNS",
    "UPLINK_COLUMNS",
    "endpoint_labels",
    "host_matrix",
    "host_pairs_of",
    "pair_class",
    "scope_split",
    "spread",
    "to_file",
    "uplink_load",
    "vm_hosts",
    "vm_matrix",
]

EXTERNAL: Final = "(external)"
"""The name of an end outside every host (and of its "host")."""
MATRIX_COLUMNS: Final = ("bin_ns", "src", "dst", "bytes", "packets", "flows")
"""Columns of a matrix: bin start (ns since the epoch), directed pair, counters."""
UPLINK_COLUMNS: Final = ("bin_ns", "host", "bytes_out", "bytes_in", "packets_out", "packets_in")
_COUNTERS: Final = ("bytes", "packets", "flows")


def endpoint_labels(vm: pd.Series, host: pd.Series) -> npt.NDArray[np.object_]:
    """The name of each end: the VM, else ``?@HOST``, else ``EXTERNAL``."""
    vm_s = vm.astype(object).where(vm.notna(), None)
    host_s = host.astype(object).where(host.notna(), None)
    unknown = ("?@" + host_s.fillna("").astype(str)).where(host_s.notna(), EXTERNAL)
    return np.asarray(vm_s.where(vm_s.notna(), unknown), dtype=object)


def _host_labels(host: pd.Series) -> npt.NDArray[np.object_]:
    return np.asarray(host.astype(object).where(host.notna(), EXTERNAL), dtype=object)


def vm_hosts(flows: pd.DataFrame) -> dict[str, str]:
    """VM (as named by ``endpoint_labels``) → its host in the latest flow that shows it."""
    ends = pd.DataFrame(
        {
            "vm": np.concatenate(
                [
                    endpoint_labels(flows["src_vm"], flows["src_host"]),
                    endpoint_labels(flows["dst_vm"], flows["dst_host"]),
                ]
            ),
            "host": np.concatenate(
                [_host_labels(flows["src_host"]), _host_labels(flows["dst_host"])]
            ),
            "last_ns": np.concatenate([flows["last_ns"].to_numpy()] * 2),
        }
    )
    ends = ends[ends["host"] != EXTERNAL].sort_values(["last_ns", "vm"], kind="stable")
    latest = ends.drop_duplicates("vm", keep="last")
    return dict(zip(latest["vm"].tolist(), latest["host"].tolist(), strict=True))


def spread(flows: pd.DataFrame, bin_ns: int) -> pd.DataFrame:
    """One row per (flow, bin it overlaps): ``row`` (position in ``flows``), ``bin_ns`` and
    ``weight``, the share of the flow's time inside the bin (weights of a flow sum to 1)."""
    if bin_ns <= 0:
        raise ValueError(f"bin must be positive, got {bin_ns} ns")
    first = flows["first_ns"].to_numpy(dtype=np.int64)
    last = np.maximum(flows["last_ns"].to_numpy(dtype=np.int64), first)
    b0 = first // bin_ns
    # A flow ending exactly on a boundary does not reach into the next bin.
    b1 = np.where(last > first, (last - 1) // bin_ns, b0)
    count = (b1 - b0 + 1).astype(np.int64)
    row = np.repeat(np.arange(len(flows), dtype=np.int64), count)
    offset = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(count) - count, count
    )
    start = (b0[row] + offset) * bin_ns
    duration = (last - first)[row]
    overlap = np.minimum(last[row], start + bin_ns) - np.maximum(first[row], start)
    weight = np.where(duration > 0, overlap / np.where(duration > 0, duration, 1), 1.0)
    return pd.DataFrame({"row": row, "bin_ns": start, "weight": weight})


def _directed(flows: pd.DataFrame, src: npt.NDArray[np.object_], dst: npt.NDArray[np.object_],
              bin_ns: int) -> pd.DataFrame:  # fmt: skip
    parts = spread(flows, bin_ns)
    row: npt.NDArray[np.int64] = parts["row"].to_numpy(dtype=np.int64)
    w: npt.NDArray[np.float64] = parts["weight"].to_numpy(dtype=np.float64)

    def col(name: str) -> npt.NDArray[np.float64]:
        values: npt.NDArray[np.float64] = flows[name].to_numpy(dtype=np.float64)
        return values[row] * w

    fwd = pd.DataFrame({"bin_ns": parts["bin_ns"], "src": src[row], "dst": dst[row],
                        "bytes": col("bytes"), "packets": col("packets"),
                        "flows": np.ones(len(row))})  # fmt: skip
    rev = pd.DataFrame({"bin_ns": parts["bin_ns"], "src": dst[row], "dst": src[row],
                        "bytes": col("bytes_rev"), "packets": col("packets_rev"),
                        "flows": np.zeros(len(row))})  # fmt: skip
    both = pd.concat([fwd, rev], ignore_index=True)
    both = both[(both["bytes"] > 0) | (both["packets"] > 0) | (both["flows"] > 0)]
    out = both.groupby(["bin_ns", "src", "dst"], sort=True, as_index=False)[list(_COUNTERS)].sum()
    out["flows"] = out["flows"].round().astype(np.int64)
    return out[list(MATRIX_COLUMNS)].reset_index(drop=True)


def vm_matrix(flows: pd.DataFrame, bin_s: float = 3600) -> pd.DataFrame:
    """The directed VM-pair matrix per bin (``MATRIX_COLUMNS``)."""
    src = endpoint_labels(flows["src_vm"], flows["src_host"])
    dst = endpoint_labels(flows["dst_vm"], flows["dst_host"])
    return _directed(flows, src, dst, int(bin_s * 1e9))


def host_matrix(flows: pd.DataFrame, bin_s: float = 3600) -> pd.DataFrame:
    """The directed host-pair matrix per bin (``MATRIX_COLUMNS``; ``EXTERNAL`` outside)."""
    src, dst = _host_labels(flows["src_host"]), _host_labels(flows["dst_host"])
    return _directed(flows, src, dst, int(bin_s * 1e9))


def host_pairs_of(vm_pairs: pd.DataFrame, placement: Mapping[str, str]) -> pd.DataFrame:
    """A VM-pair matrix (any counters) relabelled to host pairs by ``placement`` (VM →
    host; ``EXTERNAL`` and unplaced ends → ``EXTERNAL``) and summed."""
    table = {**placement, EXTERNAL: EXTERNAL}
    out = vm_pairs.assign(
        src=vm_pairs["src"].map(table).fillna(EXTERNAL),
        dst=vm_pairs["dst"].map(table).fillna(EXTERNAL),
    )
    keys = [c for c in ("bin_ns", "src", "dst") if c in out.columns]
    values = [c for c in out.columns if c not in keys]
    return out.groupby(keys, sort=True, as_index=False)[values].sum()


def pair_class(src: pd.Series, dst: pd.Series) -> npt.NDArray[np.str_]:
    """``intra-host``, ``cross-host`` or ``external`` per directed host pair."""
    ext = (src == EXTERNAL).to_numpy() | (dst == EXTERNAL).to_numpy()
    same = (src == dst).to_numpy()
    return np.where(ext, "external", np.where(same, "intra-host", "cross-host"))


def scope_split(hosts: pd.DataFrame) -> pd.DataFrame:
    """Per bin, the host matrix's counters by class: columns ``bin_ns``, ``scope``,
    ``bytes``, ``packets``, ``flows``."""
    tagged = hosts.assign(scope=pair_class(hosts["src"], hosts["dst"]))
    return tagged.groupby(["bin_ns", "scope"], sort=True, as_index=False)[list(_COUNTERS)].sum()


def uplink_load(hosts: pd.DataFrame) -> pd.DataFrame:
    """Per bin and host, the bytes and packets leaving and entering it (``UPLINK_COLUMNS``),
    from a host matrix (per bin, or any frame with ``src``, ``dst``, ``bytes``,
    ``packets``; without ``bin_ns`` the result has none either)."""
    wire = hosts[pair_class(hosts["src"], hosts["dst"]) != "intra-host"]
    keys = ["bin_ns"] if "bin_ns" in wire.columns else []
    out = wire[[*keys, "src", "bytes", "packets"]].rename(columns={"src": "host"})
    inn = wire[[*keys, "dst", "bytes", "packets"]].rename(columns={"dst": "host"})
    frames = [
        out.rename(columns={"bytes": "bytes_out", "packets": "packets_out"}),
        inn.rename(columns={"bytes": "bytes_in", "packets": "packets_in"}),
    ]
    both = pd.concat(frames, ignore_index=True).fillna(0.0)
    both = both[both["host"] != EXTERNAL]
    counters = ["bytes_out", "bytes_in", "packets_out", "packets_in"]
    summed: pd.DataFrame = both.groupby([*keys, "host"], sort=True, as_index=False)[counters].sum()
    return summed.reindex(columns=[*keys, "host", *counters])


_WRITERS: Final = {
    ".csv": lambda df, p: df.to_csv(p, index=False),
    ".json": lambda df, p: df.to_json(p, orient="records", indent=None),
    ".parquet": lambda df, p: df.to_parquet(p, index=False),
}


def to_file(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` as CSV, JSON (records) or Parquet, chosen by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    writer = _WRITERS.get(suffix)
    if writer is None:
        raise ValueError(f"{path}: unknown suffix {suffix!r}; expected .csv, .json or .parquet")
    writer(df, path)
