"""What the analyzer's parts produce, as rows of the store's tables.

Each function takes the domain objects (inventory events, migrations, policy hits, the
receivers' accounting) and returns a DataFrame with the columns of one store table
(``store_schema``). Rows without a VM identity where the table needs one are left out (they
stay in the in-memory history) — a host appearing, say, has no VM.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vspan.analysis.inventory_snapshot import EventKind, InventoryEvent, Migration

__all__ = ["collector_rows", "history_rows", "hit_rows", "migration_rows", "uuid_or_none"]

_EVENT = {EventKind.VM_ADDED: "added", EventKind.VM_REMOVED: "removed",
          EventKind.VM_CHANGED: "changed"}  # fmt: skip


def uuid_or_none(text: str | None) -> str | None:
    """``text`` as canonical UUID text, or None when it is empty or not a UUID."""
    if not text:
        return None
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return None


def _utc(seconds: Sequence[float] | np.ndarray) -> pd.Series:
    return pd.Series(pd.to_datetime(np.asarray(seconds, dtype=np.float64), unit="s", utc=True))


def history_rows(events: Sequence[InventoryEvent]) -> pd.DataFrame:
    """``inventory_history`` rows of the VM events among ``events``."""
    kept = [e for e in events if e.kind in _EVENT and uuid_or_none(e.vm_uuid)]
    return pd.DataFrame({
        "time": _utc([e.time for e in kept]),
        "host": [e.host for e in kept],
        "vm_uuid": [uuid_or_none(e.vm_uuid) for e in kept],
        "vm_name": [e.vm_name for e in kept],
        "event": [_EVENT[e.kind] for e in kept],
    })  # fmt: skip


def migration_rows(moves: Sequence[Migration]) -> pd.DataFrame:
    """``migrations`` rows (a VM known only by MAC has no row: the table keys by UUID)."""
    kept = [m for m in moves if uuid_or_none(m.vm_uuid)]
    return pd.DataFrame({
        "time": _utc([m.time for m in kept]),
        "vm_uuid": [uuid_or_none(m.vm_uuid) for m in kept],
        "vm_name": [m.vm_name for m in kept],
        "from_host": [m.from_host or None for m in kept],
        "to_host": [m.to_host for m in kept],
        "source": [str(m.source) for m in kept],
    })  # fmt: skip


_HIT_COLUMNS = ("rule", "vm_uuid", "vm_name", "verdict", "flows", "packets", "bytes", "last_hit")


def hit_rows(hits: pd.DataFrame) -> pd.DataFrame:
    """``policy_hits`` increments from a ``PolicyResult.hits`` frame (VMs with a UUID)."""
    if hits.empty:
        return pd.DataFrame(columns=list(_HIT_COLUMNS))
    uuids = hits["vm"].map(uuid_or_none)
    kept = hits[uuids.notna()]
    return pd.DataFrame({
        "rule": kept["rule"].astype(str),  # as verdicts name it: db#2, db#default
        "vm_uuid": uuids[uuids.notna()],
        "vm_name": kept["vm_name"],
        "verdict": kept["action"],
        "flows": kept["flows"],
        "packets": kept["packets"],
        "bytes": kept["bytes"],
        "last_hit": pd.to_datetime(kept["last_ns"], unit="ns", utc=True),
    }).reset_index(drop=True)  # fmt: skip


def collector_rows(streams: pd.DataFrame, invalid: pd.DataFrame, now: float) -> pd.DataFrame:
    """``collector_counters`` samples: one row per (collector, boot) of the accounting."""
    if streams.empty:
        return pd.DataFrame()
    by_collector: dict[int, dict[str, int]] = {}
    for cid, reason, n in invalid.itertuples(index=False, name=None):
        by_collector.setdefault(int(cid), {})[str(reason)] = int(n)
    out = pd.DataFrame({
        "time": _utc(np.full(len(streams), now)),
        "collector_id": streams["collector_id"].astype(np.int64).to_numpy(),
        "boot_id": streams["boot_id"].astype(np.int64).to_numpy(),
    })  # fmt: skip
    for column in ("received", "lost", "kernel", "duplicates", "reordered", "frames", "bytes"):
        out[column] = streams[column].astype(np.int64).to_numpy() if column in streams else 0
    out["invalid"] = pd.Series(
        [by_collector.get(int(c), {}) for c in out["collector_id"]], index=out.index, dtype=object
    )
    return out
