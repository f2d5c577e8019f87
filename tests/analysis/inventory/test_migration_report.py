"""Whether a VM's own port-profile followed it across a migration: its bindings on the old
and the new host, and its stored flows."""

from __future__ import annotations

import pandas as pd

from vspan.analysis.inventory.migration_report import policy_followed

S = 10**9
T = 1_700_000_000
MOVE = pd.Timestamp(T + 100, unit="s", tz="UTC")
DB = "00000000-0000-4000-8000-0000000000db"
APP = "00000000-0000-4000-8000-0000000000a1"


def _flows(rows: list[tuple[str, str, str, str, int, str | None]]) -> pd.DataFrame:
    """(src_vm, src_host, dst_vm, dst_host, first second, policy_rule) per flow."""
    return pd.DataFrame({
        "src_vm": [r[0] for r in rows], "src_host": [r[1] for r in rows],
        "dst_vm": [r[2] for r in rows], "dst_host": [r[3] for r in rows],
        "first_ns": [r[4] * S for r in rows], "last_ns": [(r[4] + 5) * S for r in rows],
        "policy_rule": [r[5] for r in rows],
    })  # fmt: skip


def _bindings(rows: list[tuple[int, str, str, str | None, str]]) -> pd.DataFrame:
    """(second, host, vm_key, profile, event) per inventory change."""
    return pd.DataFrame({
        "time": [pd.Timestamp(r[0], unit="s", tz="UTC") for r in rows],
        "host": [r[1] for r in rows], "vm_key": [r[2] for r in rows],
        "profile": [r[3] for r in rows], "event": [r[4] for r in rows],
    })  # fmt: skip


def _move(vm: str = "db-01", key: str = DB) -> pd.DataFrame:
    return pd.DataFrame({"time": [MOVE], "vm_name": [vm], "vm_key": [key],
                         "from_host": ["hv01"], "to_host": ["hv02"]})  # fmt: skip


# db-01 (profile db) was on hv01; app-01 (profile app) on hv03 talks to it.
BEFORE = [(T, "hv01", DB, "db", "added"), (T, "hv03", APP, "app", "added")]


def test_the_same_profile_bound_on_the_new_host_is_followed() -> None:
    flows = _flows([
        ("app-01", "hv03", "db-01", "hv01", T + 10, "db#1"),  # before, old host
        ("app-01", "hv03", "db-01", "hv01", T + 20, "db#2"),
        ("app-01", "hv03", "db-01", "hv02", T + 200, "db#1"),  # after, new host
        ("app-01", "hv03", "db-01", "hv02", T + 210, "app#default"),
        ("app-01", "hv03", "db-01", "hv01", T + 300, "db#1"),  # after, but on the old host
    ])  # fmt: skip
    bindings = _bindings([*BEFORE, (T + 99, "hv01", DB, "db", "removed"),
                          (T + 100, "hv02", DB, "db", "added")])  # fmt: skip
    row = policy_followed(_move(), flows, bindings).iloc[0]
    assert (row["profile"], row["flows_before"], row["flows_after"]) == ("db", 2, 2)
    assert row["decided_after"] == 1
    assert row["policy_followed"] is True


def test_the_peers_rules_deciding_do_not_make_the_vms_profile_followed() -> None:
    # app-01 opens every flow: its egress rules are the ones recorded (both ends permit).
    # db-01's own profile is lost on the new host: that is what must show, whatever app's
    # rules decided before and after.
    flows = _flows([
        ("app-01", "hv03", "db-01", "hv01", T + 10, "app#1"),
        ("app-01", "hv03", "db-01", "hv01", T + 20, "app#1"),
        ("app-01", "hv03", "db-01", "hv02", T + 200, "app#1"),
        ("app-01", "hv03", "db-01", "hv02", T + 210, "app#2"),
    ])  # fmt: skip
    lost = _bindings([*BEFORE, (T + 100, "hv02", DB, None, "added")])
    row = policy_followed(_move(), flows, lost).iloc[0]
    assert (row["profile"], row["flows_after"], row["decided_after"]) == ("db", 2, 0)
    assert row["policy_followed"] is False
    # Bound to db on the new host: followed, though app's rules are still the ones recorded.
    kept = _bindings([*BEFORE, (T + 100, "hv02", DB, "db", "added")])
    row = policy_followed(_move(), flows, kept).iloc[0]
    assert (row["decided_after"], row["policy_followed"]) == (0, True)


def test_another_profile_on_the_new_host_is_not_followed() -> None:
    flows = _flows([("db-01", "hv02", "app-01", "hv03", T + 200, "web#1")])
    bindings = _bindings([*BEFORE, (T + 100, "hv02", DB, "web", "added")])
    row = policy_followed(_move(), flows, bindings).iloc[0]
    assert (row["profile"], row["policy_followed"]) == ("db", False)


def test_without_a_binding_from_the_new_host_its_own_rules_deciding_there_is_evidence() -> None:
    # A move seen in the data plane only: the new host registered nothing.
    flows = _flows([
        ("db-01", "hv01", "app-01", "hv03", T + 10, "db#3"),
        ("db-01", "hv02", "app-01", "hv03", T + 200, "db#3"),
    ])  # fmt: skip
    row = policy_followed(_move(), flows, _bindings(BEFORE)).iloc[0]
    assert (row["decided_after"], row["policy_followed"]) == (1, True)
    # The peer's rule recorded on the new host: nothing can be told.
    flows.loc[1, "policy_rule"] = "app#1"
    row = policy_followed(_move(), flows, _bindings(BEFORE)).iloc[0]
    assert (row["decided_after"], row["policy_followed"]) == (0, None)


def test_no_evidence_yet_is_neither_yes_nor_no() -> None:
    flows = _flows([("db-01", "hv01", "app-01", "hv03", T + 10, "db#3")])
    row = policy_followed(_move(), flows, _bindings(BEFORE)).iloc[0]
    assert row["flows_after"] == 0
    assert row["policy_followed"] is None
    # A VM without a profile before the move has nothing to follow.
    bare = "00000000-0000-4000-8000-0000000000c1"
    bindings = _bindings([(T, "hv01", bare, None, "added"), (T + 100, "hv02", bare, "db", "added")])
    row = policy_followed(_move("cache-01", bare), flows, bindings).iloc[0]
    assert (row["profile"], row["policy_followed"]) == (None, None)


def test_a_vm_without_a_uuid_is_judged_by_its_own_bindings() -> None:
    # Regression (issue 17, point 1): the bindings were matched by vm_uuid, which a VM found
    # behind a Linux bridge has not: its migrations had no profile, and two such VMs would
    # have shared one. Each is its vm_key.
    db, cache = "name:db-01", "name:cache-01"
    flows = _flows([("db-01", "hv02", "app-01", "hv03", T + 200, "db#1")])
    bindings = _bindings([
        (T, "hv01", db, "db", "added"), (T, "hv01", cache, "cache", "added"),
        (T + 100, "hv02", db, "db", "added"), (T + 100, "hv02", cache, "web", "added"),
    ])  # fmt: skip
    moves = pd.concat([_move("db-01", db), _move("cache-01", cache)], ignore_index=True)
    rows = policy_followed(moves, flows, bindings)
    assert rows[["profile", "policy_followed"]].values.tolist() == [["db", True], ["cache", False]]
