"""Did the policy follow the VM? The port-profile seen before a migration, and after it.

A port-profile belongs to a VM, not to a host or port, so after a live migration the same
profile must decide the VM's flows on the new host, and its rules must keep counting hits
there. For each migration this compares the VM's stored flows on the old host before the
move with those on the new host after it: which profile's rules decided them (the prefix of
``policy_rule``, ``db#2`` → ``db``), and how many flows after the move that profile decided.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["FOLLOWED_COLUMNS", "policy_followed"]

FOLLOWED_COLUMNS: Final = (
    "profile", "flows_before", "flows_after", "decided_after", "policy_followed",
)  # fmt: skip
"""Columns added to each migration: ``profile`` (the profile whose rules decided most of the
VM's flows on the old host), ``flows_before``/``flows_after`` (the VM's flows on the old host
before the move / on the new host after it), ``decided_after`` (of those after, decided by
that profile's rules), ``policy_followed`` (True when the profile decided flows on the new
host, False when flows were seen there but none by that profile, None without evidence)."""


def _on_host(flows: pd.DataFrame, vm: object, host: object) -> npt.NDArray[np.bool_]:
    src = (flows["src_vm"] == vm) & (flows["src_host"] == host)
    dst = (flows["dst_vm"] == vm) & (flows["dst_host"] == host)
    return np.asarray((src | dst).fillna(False), dtype=np.bool_)


def _profiles(rules: pd.Series) -> pd.Series:
    return rules.dropna().astype(str).str.split("#", n=1).str[0]


def policy_followed(migrations: pd.DataFrame, flows: pd.DataFrame) -> pd.DataFrame:
    """``migrations`` (``time``, ``vm_name``, ``from_host``, ``to_host``) with
    ``FOLLOWED_COLUMNS``, from the flow records of the migrated VMs (with ``first_ns``,
    ``last_ns``, ``policy_rule``)."""
    out = migrations.reset_index(drop=True).copy()
    columns: dict[str, list[object]] = {c: [] for c in FOLLOWED_COLUMNS}
    when = pd.to_datetime(out["time"], utc=True).dt.as_unit("ns").astype("int64").tolist()
    for row, moved_ns in zip(out.itertuples(index=False), when, strict=True):
        before = flows[_on_host(flows, row.vm_name, row.from_host) & (flows["last_ns"] <= moved_ns)]
        after = flows[_on_host(flows, row.vm_name, row.to_host) & (flows["first_ns"] >= moved_ns)]
        seen = _profiles(before["policy_rule"])
        profile = None if seen.empty else str(seen.value_counts().index[0])
        decided = int((_profiles(after["policy_rule"]) == profile).sum()) if profile else 0
        followed: bool | None = None
        if profile is not None and len(after):
            followed = decided > 0
        for name, value in zip(
            FOLLOWED_COLUMNS, (profile, len(before), len(after), decided, followed), strict=True
        ):
            columns[name].append(value)
    for name, values in columns.items():
        out[name] = pd.Series(values, index=out.index, dtype=object)
    return out
