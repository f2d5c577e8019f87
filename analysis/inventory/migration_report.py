"""Did the policy follow the VM? Its own port-profile before a migration, and after it.

A port-profile belongs to a VM, not to a host or port, so after a live migration the same
profile must be bound to the VM on the new host and decide its flows there. For each
migration this takes the VM's own profile from the inventory's bindings — what the old host
registered for it before the move, and what the new host registered — and, as evidence
where the new host registered nothing, the VM's stored flows on the new host after the
move that its own profile's rules decided (the prefix of ``policy_rule``, ``db#2`` → ``db``).

A flow's deciding rule may be the peer's: both ends' profiles are checked and the source's
(egress) rule is the one recorded when both permit. So the profile that decided a VM's flows
says nothing about whether the VM's own profile followed it; only its own binding does.
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
"""Columns added to each migration: ``profile`` (the VM's own port-profile before the move:
its binding on the old host), ``flows_before``/``flows_after`` (the VM's flows on the old host
before the move / on the new host after it), ``decided_after`` (of those after, decided by
its own profile's rules), ``policy_followed`` (True when the new host bound the VM to the same
profile — or, without a binding from the new host, when that profile decided flows there;
False when the new host bound it to another profile or to none; None when the VM had no
profile before the move, or nothing is known yet of the new host)."""


def _on_host(flows: pd.DataFrame, vm: object, host: object) -> npt.NDArray[np.bool_]:
    src = (flows["src_vm"] == vm) & (flows["src_host"] == host)
    dst = (flows["dst_vm"] == vm) & (flows["dst_host"] == host)
    return np.asarray((src | dst).fillna(False), dtype=np.bool_)


def _profiles(rules: pd.Series) -> pd.Series:
    return rules.dropna().astype(str).str.split("#", n=1).str[0]


def _binding(rows: pd.DataFrame) -> tuple[bool, str | None]:
    """(whether ``rows`` — binding events, oldest first — say anything, the last profile)."""
    if rows.empty:
        return False, None
    last = rows["profile"].iloc[-1]
    return True, None if pd.isna(last) else str(last)


def policy_followed(
    migrations: pd.DataFrame, flows: pd.DataFrame, bindings: pd.DataFrame
) -> pd.DataFrame:
    """``migrations`` (``time``, ``vm_key``, ``vm_name``, ``from_host``, ``to_host``) with
    ``FOLLOWED_COLUMNS``, from the bindings of the migrated VMs (the inventory history:
    ``time``, ``host``, ``vm_key``, ``profile``, ``event``; a VM is its ``vm_key``, with or
    without a UUID) and their flow records (with ``first_ns``, ``last_ns``, ``policy_rule``)."""
    out = migrations.reset_index(drop=True).copy()
    columns: dict[str, list[object]] = {c: [] for c in FOLLOWED_COLUMNS}
    when = pd.to_datetime(out["time"], utc=True).dt.as_unit("ns").astype("int64").tolist()
    history = bindings.assign(
        _ns=pd.to_datetime(bindings["time"], utc=True).dt.as_unit("ns").astype("int64"),
        _vm=bindings["vm_key"].astype(str),
    ).sort_values("_ns", kind="stable")
    for row, moved_ns in zip(out.itertuples(index=False), when, strict=True):
        mine = history[history["_vm"] == str(row.vm_key)]
        old = mine[(mine["host"] == row.from_host) & (mine["_ns"] <= moved_ns)]
        _, profile = _binding(old)
        new = mine[(mine["host"] == row.to_host) & (mine["event"] != "removed")]
        registered, profile_after = _binding(new)
        before = flows[_on_host(flows, row.vm_name, row.from_host) & (flows["last_ns"] <= moved_ns)]
        later = flows[_on_host(flows, row.vm_name, row.to_host) & (flows["first_ns"] >= moved_ns)]
        decided = int((_profiles(later["policy_rule"]) == profile).sum()) if profile else 0
        followed: bool | None = None
        if profile is not None and registered:
            followed = profile_after == profile
        elif profile is not None and decided:
            followed = True
        for name, value in zip(
            FOLLOWED_COLUMNS, (profile, len(before), len(later), decided, followed), strict=True
        ):
            columns[name].append(value)
    for name, values in columns.items():
        out[name] = pd.Series(values, index=out.index, dtype=object)
    return out
