"""What the analyzer's parts produce, as rows of the store's tables.

Each function takes the domain objects (inventory events, migrations, policy hits, the
receivers' accounting) and returns a DataFrame with the columns of one store table
(``store.schema``). A VM is kept under its ``vm_key`` — its UUID, or its name when it has none
(a VM a collector found behind a Linux bridge) — so every VM event, migration and policy hit
has a row; one without a VM name or UUID cannot be stored, and the store counts it
(``rejected{null_vm_key}``) and logs it. ``identity_change`` says when a VM's earlier rows
must follow it to a new key (``Store.rekey_vm``). The inventory events that change no VM's
own record — a host appearing, a MAC claimed by two VMs — and moves (``migrations``, a table
of their own) are no rows of ``inventory_history``.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Collection, Sequence
from typing import Final

import numpy as np
import pandas as pd

from vspan.analysis.ingest.accounting import SAVED_COLUMNS
from vspan.analysis.inventory.snapshot import EventKind, InventoryEvent, Migration
from vspan.analysis.store.schema import vm_key
from vspan.analysis.store.sql import vm_keys

__all__ = [
    "collector_rows",
    "history_rows",
    "hit_rows",
    "identity_change",
    "migration_rows",
    "saved_streams",
    "uuid_or_none",
]

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
    """``inventory_history`` rows of the VM events among ``events`` (a VM added, removed or
    changed), with or without a UUID."""
    kept = [e for e in events if e.kind in _EVENT]
    frame = pd.DataFrame({
        "time": _utc([e.time for e in kept]),
        "host": pd.Series([e.host for e in kept], dtype=object),
        "vm_uuid": pd.Series([e.vm_uuid for e in kept], dtype=object),
        "vm_name": pd.Series([e.vm_name for e in kept], dtype=object),
        "event": pd.Series([_EVENT[e.kind] for e in kept], dtype=object),
    })  # fmt: skip
    return frame.assign(vm_key=vm_keys(frame["vm_uuid"], frame["vm_name"]))


def migration_rows(moves: Sequence[Migration]) -> pd.DataFrame:
    """``migrations`` rows, one per move, with or without a UUID."""
    frame = pd.DataFrame({
        "time": _utc([m.time for m in moves]),
        "vm_uuid": pd.Series([m.vm_uuid for m in moves], dtype=object),
        "vm_name": pd.Series([m.vm_name for m in moves], dtype=object),
        "from_host": pd.Series([m.from_host or None for m in moves], dtype=object),
        "to_host": pd.Series([m.to_host for m in moves], dtype=object),
        "source": pd.Series([str(m.source) for m in moves], dtype=object),
    })  # fmt: skip
    return frame.assign(vm_key=vm_keys(frame["vm_uuid"], frame["vm_name"]))


_HIT_COLUMNS = (
    "rule", "vm_key", "vm_uuid", "vm_name", "verdict", "flows", "packets", "bytes", "last_hit",
)  # fmt: skip


def hit_rows(hits: pd.DataFrame) -> pd.DataFrame:
    """``policy_hits`` increments from a ``PolicyResult.hits`` frame, whose ``vm`` is the
    VM's UUID when it has one, else its name (``policy.Bindings.key_of``)."""
    if hits.empty:
        return pd.DataFrame(columns=list(_HIT_COLUMNS))
    uuids = hits["vm"].astype(object).map(uuid_or_none)
    names = hits["vm_name"].astype(object).where(hits["vm_name"].notna(), hits["vm"])
    return pd.DataFrame({
        "rule": hits["rule"].astype(str),  # as verdicts name it: db#2, db#default
        "vm_key": vm_keys(uuids, names),
        "vm_uuid": uuids,
        "vm_name": hits["vm_name"],
        "verdict": hits["action"],
        "flows": hits["flows"],
        "packets": hits["packets"],
        "bytes": hits["bytes"],
        "last_hit": pd.to_datetime(hits["last_ns"], unit="ns", utc=True),
    }).reset_index(drop=True)  # fmt: skip


def identity_change(event: InventoryEvent) -> tuple[str, str, str | None] | None:
    """(old ``vm_key``, new ``vm_key``, UUID) when ``event`` changed a VM's key — it got a
    UUID, or, without one, a new name — else None."""
    if event.kind is not EventKind.VM_CHANGED or event.before is None:
        return None
    old = vm_key(*event.before)
    new = vm_key(event.vm_uuid, event.vm_name)
    if old is None or new is None or old == new:
        return None
    return old, new, uuid_or_none(event.vm_uuid)


_SAMPLED: Final = (
    "received", "lost", "kernel", "missed_while_down", "duplicates", "reordered", "stale",
    "frames", "bytes",
)  # fmt: skip
"""The counters of a stream a ``collector_counters`` row keeps."""


def collector_rows(streams: pd.DataFrame, invalid: pd.DataFrame, now: float) -> pd.DataFrame:
    """``collector_counters`` samples: one row per (collector, boot) of the accounting
    (``Accounting.streams()``), with what a restart needs to resume it (``saved_streams``):
    its highest seq and when it was last seen."""
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
    for column in _SAMPLED:
        out[column] = streams[column].astype(np.int64).to_numpy() if column in streams else 0
    out["invalid"] = pd.Series(
        [by_collector.get(int(c), {}) for c in out["collector_id"]], index=out.index, dtype=object
    )
    out["highest_seq"] = streams["highest"].astype(np.int64).to_numpy()
    out["last_seen"] = _utc(streams["last_seen"].astype(np.float64).to_numpy())
    return out


def _newest_boot(boots: list[int]) -> int:
    """The newest of a collector's boots in serial order, modulo 2^32 (vspan's collectors
    take the time of their start as ``boot_id``: the newest started last)."""
    newest = boots[0]
    for boot in boots[1:]:
        if 0 < (boot - newest) % (1 << 32) < 1 << 31:
            newest = boot
    return newest


def saved_streams(newest: pd.DataFrame, keyed: Collection[int] = ()) -> pd.DataFrame:
    """What ``Accounting.restore`` brings back at the analyzer's start, from the rows of each
    collector's newest ``collector_counters`` sample (``newest``): per collector its newest
    boot (``SAVED_COLUMNS``), once. A collector missing from the last sample of all had been
    forgotten (evicted) before the analyzer stopped: it is not restored, unless it has a key
    (in ``keyed``) — then its boot only, as is a row saved before schema 6 (no highest seq)."""
    if newest.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SAVED_COLUMNS})
    frame = newest.rename(columns={"highest_seq": "highest"})
    for column in ("highest", "last_seen", *_SAMPLED):  # older samples lack some
        if column not in frame:
            frame[column] = None
    last = frame["time"] == frame["time"].max()
    frame = frame[last | frame["collector_id"].isin(list(keyed))].copy()
    frame.loc[~last[frame.index], "highest"] = None  # forgotten then: the boot of a keyed one
    boots = frame.groupby("collector_id")["boot_id"].agg(lambda b: _newest_boot(b.tolist()))
    frame = frame[frame["boot_id"].to_numpy() == boots.reindex(frame["collector_id"]).to_numpy()]
    seen = pd.to_datetime(frame["last_seen"], utc=True)
    frame["last_seen"] = (seen - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    out: pd.DataFrame = frame[list(SAVED_COLUMNS)]
    return out.reset_index(drop=True)
