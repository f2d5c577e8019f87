"""What the analyzer's parts hand the store: inventory events, migrations and policy hits as
rows, a VM with or without a UUID, and the identity changes that move a VM's rows.

Regression (issue 17, point 1): ``history_rows``, ``migration_rows`` and ``hit_rows`` left out,
silently, every row of a VM without a UUID (a VM a collector found behind a Linux bridge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vspan.analysis.inventory.state import (
    EventKind,
    InventoryEvent,
    InventoryState,
    Migration,
    PortInfo,
)
from vspan.analysis.policy.evaluate import compile_policy, evaluate
from vspan.analysis.policy.profiles import load_policy
from vspan.analysis.store.persist import history_rows, hit_rows, identity_change, migration_rows

UUID = "6f1c2d9e-0000-4000-8000-0000000000b1"
MAC_A, MAC_B = 0x0266_0000_0001, 0x0266_0000_0002


def _plain(frame: pd.DataFrame) -> list[list[Any]]:
    values = frame.astype(object)
    return values.where(values.notna(), None).values.tolist()


def _lab() -> tuple[InventoryState, list[InventoryEvent], list[Migration]]:
    """a and b, no UUID, on h1; a moves to h2; b gets a UUID; a is renamed; b is renamed."""
    events: list[InventoryEvent] = []
    moves: list[Migration] = []
    state = InventoryState(history_sink=events.append, migration_sink=moves.append)
    state.register(1, "h1", [PortInfo("a", 1, MAC_A), PortInfo("b", 2, MAC_B)], 10.0)
    state.register(2, "h2", [PortInfo("a", 1, MAC_A)], 20.0)
    state.register(1, "h1", [PortInfo("b", 2, MAC_B, UUID)], 30.0)
    state.register(2, "h2", [PortInfo("a2", 1, MAC_A, profile="lab")], 40.0)
    state.register(1, "h1", [PortInfo("b2", 2, MAC_B, UUID)], 50.0)
    return state, events, moves


def test_every_vm_event_and_migration_is_a_row_with_or_without_a_uuid() -> None:
    _, events, moves = _lab()
    rows = history_rows(events)
    assert _plain(rows[["host", "vm_name", "vm_uuid", "event", "vm_key"]]) == [
        ["h1", "a", None, "added", "name:a"],
        ["h1", "b", None, "added", "name:b"],
        ["h1", "b", UUID, "changed", UUID],
        ["h2", "a2", None, "changed", "name:a2"],
        ["h1", "b2", UUID, "changed", UUID],
    ]
    assert len(rows) == sum(e.kind in {EventKind.VM_ADDED, EventKind.VM_CHANGED} for e in events)
    moved = migration_rows(moves)
    assert _plain(moved[["vm_name", "vm_uuid", "from_host", "to_host", "source", "vm_key"]]) == [
        ["a", None, "h1", "h2", "inventory", "name:a"]
    ]


def test_a_new_uuid_or_a_new_name_without_one_moves_the_vms_rows() -> None:
    _, events, _ = _lab()
    changes = [identity_change(e) for e in events]
    assert [c for c in changes if c is not None] == [
        ("name:b", UUID, UUID),  # b got a UUID
        ("name:a", "name:a2", None),  # a, without one, was renamed
    ]  # b renamed keeps its key (its UUID); the other events change no identity
    changed = [e for e in events if e.kind is EventKind.VM_CHANGED]
    assert [e.before for e in changed] == [(None, "b"), (None, "a"), (UUID, "b")]


def test_hits_of_vms_without_a_uuid_are_rows(tmp_path: Path) -> None:
    state, _, _ = _lab()
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  - {name: lab, default: deny, vms: ['a*', 'b*']}\n")
    policy = load_policy(str(profiles))
    records = pd.DataFrame({
        "src_vm": ["a2", "b2"], "dst_vm": [None, None], "src_host": ["h2", "h1"],
        "dst_host": [None, None], "host": ["h2", "h1"], "scope": "external", "proto": 17,
        "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "src_port": 1, "dst_port": 2,
        "packets": [3, 4], "bytes": [300, 400], "packets_rev": 0, "bytes_rev": 0,
        "first_ns": 10**18, "last_ns": 10**18,
    })  # fmt: skip
    hits = evaluate(records, compile_policy(policy, state.snapshot())).hits
    rows = hit_rows(hits)
    assert _plain(rows[["rule", "vm_key", "vm_uuid", "vm_name", "flows", "packets"]]) == [
        ["lab#default", "name:a2", None, "a2", 1, 3],
        ["lab#default", UUID, UUID, "b2", 1, 4],
    ]
