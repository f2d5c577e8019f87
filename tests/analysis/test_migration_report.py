"""Whether a VM's port-profile followed it across a migration, from its stored flows."""

from __future__ import annotations

import pandas as pd

from vspan.analysis.migration_report import policy_followed

S = 10**9
MOVE = pd.Timestamp(1_700_000_100, unit="s", tz="UTC")


def _flows(rows: list[tuple[str, str, str, str, int, str | None]]) -> pd.DataFrame:
    """(src_vm, src_host, dst_vm, dst_host, first second, policy_rule) per flow."""
    return pd.DataFrame({
        "src_vm": [r[0] for r in rows], "src_host": [r[1] for r in rows],
        "dst_vm": [r[2] for r in rows], "dst_host": [r[3] for r in rows],
        "first_ns": [r[4] * S for r in rows], "last_ns": [(r[4] + 5) * S for r in rows],
        "policy_rule": [r[5] for r in rows],
    })  # fmt: skip


def _move(vm: str = "db-01") -> pd.DataFrame:
    return pd.DataFrame({"time": [MOVE], "vm_name": [vm], "from_host": ["hv01"],
                         "to_host": ["hv02"]})  # fmt: skip


def test_the_same_profile_deciding_flows_on_the_new_host_is_followed() -> None:
    t = 1_700_000_000
    flows = _flows([
        ("app-01", "hv03", "db-01", "hv01", t + 10, "db#1"),  # before, old host
        ("app-02", "hv03", "db-01", "hv01", t + 20, "db#2"),
        ("app-01", "hv03", "db-01", "hv02", t + 200, "db#1"),  # after, new host
        ("app-01", "hv03", "db-01", "hv02", t + 210, "app#default"),
        ("app-01", "hv03", "db-01", "hv01", t + 300, "db#1"),  # after, but on the old host
    ])  # fmt: skip
    row = policy_followed(_move(), flows).iloc[0]
    assert (row["profile"], row["flows_before"], row["flows_after"]) == ("db", 2, 2)
    assert row["decided_after"] == 1
    assert row["policy_followed"] is True


def test_flows_on_the_new_host_without_the_profile_are_not_followed() -> None:
    t = 1_700_000_000
    flows = _flows([
        ("db-01", "hv01", "app-01", "hv03", t + 10, "db#3"),
        ("db-01", "hv02", "app-01", "hv03", t + 200, None),  # undecided on the new host
    ])  # fmt: skip
    row = policy_followed(_move(), flows).iloc[0]
    assert (row["flows_after"], row["decided_after"], row["policy_followed"]) == (1, 0, False)


def test_no_evidence_yet_is_neither_yes_nor_no() -> None:
    t = 1_700_000_000
    flows = _flows([("db-01", "hv01", "app-01", "hv03", t + 10, "db#3")])
    row = policy_followed(_move(), flows).iloc[0]
    assert row["flows_after"] == 0
    assert row["policy_followed"] is None
