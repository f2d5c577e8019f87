"""InventoryState: registrations, identity across hosts, migrations, history, snapshots."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from vspan.analysis.flows.endpoints import NicDirectory
from vspan.analysis.inventory.state import (
    EventKind,
    Heartbeat,
    InventoryConfig,
    InventoryEvent,
    InventoryState,
    Migration,
    MigrationSource,
    PortInfo,
    RegistrationError,
    UnknownCollectorError,
)
from vspan.inventory import Inventory

U_WEB = "6f1c2d9e-0000-4000-8000-000000000001"
U_DB = "6f1c2d9e-0000-4000-8000-000000000002"
U_APP = "6f1c2d9e-0000-4000-8000-000000000003"
MAC_WEB, MAC_WEB2, MAC_DB, MAC_APP = 0x525400000001, 0x525400000101, 0x525400000002, 0x525400000003


def web(vif: int = 1, vif2: int = 2) -> list[PortInfo]:
    return [
        PortInfo("web-01", vif, MAC_WEB, U_WEB, "web", "vnet0"),
        PortInfo("web-01", vif2, MAC_WEB2, U_WEB, None, "vnet1"),
    ]


def db(vif: int = 3, uuid: str | None = U_DB) -> PortInfo:
    return PortInfo("db-01", vif, MAC_DB, uuid, "db", "vnet2")


def app(vif: int = 1) -> PortInfo:
    return PortInfo("app-01", vif, MAC_APP, U_APP, None, "vnet7")


class Recorder:
    def __init__(self) -> None:
        self.events: list[InventoryEvent] = []
        self.moves: list[Migration] = []

    def state(self, **config: float) -> InventoryState:
        return InventoryState(
            InventoryConfig(**config),  # type: ignore[arg-type]
            history_sink=self.events.append,
            migration_sink=self.moves.append,
        )


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def test_two_collectors_register_their_vms(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [*web(), db()], now=10.0)
    state.register(2, "hv02", [app()], now=11.0)
    snap = state.snapshot()
    assert [h.name for h in snap.hosts] == ["hv01", "hv02"]
    assert snap.resolve_vif(1, 2).name == "web-01"  # type: ignore[union-attr]
    assert snap.resolve_vif(2, 1).name == "app-01"  # type: ignore[union-attr]
    assert snap.resolve_vif(2, 3) is None
    assert snap.resolve_vif(1, 0) is None
    assert snap.resolve_mac(MAC_DB).host == "hv01"  # type: ignore[union-attr]
    assert snap.vm(U_WEB).profile == "web"  # type: ignore[union-attr]
    assert snap.host_by_id(2).name == "hv02"  # type: ignore[union-attr]
    assert [v.name for v in snap.vms_on("hv01")] == ["web-01", "db-01"]
    assert state.registrations() == {1: 10.0, 2: 11.0}
    assert rec.moves == []


def test_state_is_a_nic_directory_and_vectorized_equals_single_lookups(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [*web(), db()], now=1.0)
    state.register(2, "hv02", [app(5)], now=2.0)
    directory: NicDirectory = state
    cids = np.array([1, 1, 1, 2, 2, 1, 3], dtype=np.uint32)
    vifs = np.array([1, 2, 3, 5, 1, 0, 1], dtype=np.uint32)
    nics = directory.resolve_vifs(cids, vifs)
    snap = state.snapshot()
    vm_of = snap.nic_vm()
    by_vec = [snap.vms[vm_of[n]].name if n >= 0 else None for n in nics]
    by_one = [
        getattr(snap.resolve_vif(int(c), int(v)), "name", None)
        for c, v in zip(cids, vifs, strict=True)
    ]
    assert by_vec == by_one == ["web-01", "web-01", "db-01", "app-01", None, None, None]
    macs = np.array([MAC_WEB2, MAC_APP, 0x999, MAC_DB], dtype=np.uint64)
    host, vif = directory.nic_host_vif()
    got = [(int(host[n]), int(vif[n])) if n >= 0 else None for n in directory.resolve_macs(macs)]
    assert got == [(1, 2), (2, 5), None, (1, 3)]
    assert [getattr(snap.resolve_mac(int(m)), "name", None) for m in macs] == [
        "web-01",
        "app-01",
        None,
        "db-01",
    ]


def test_vm_registered_by_another_host_is_one_migration(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [*web(), db()], now=1.0)
    state.register(2, "hv02", [app()], now=2.0)
    before = state.snapshot()
    nic = int(before.resolve_vifs([1], [1])[0])
    # The VM shows up on hv02 (new vifs, no profile given: it keeps its own).
    moved = [replace(p, profile=None) for p in web(7, 8)]
    state.register(2, "hv02", [app(), *moved], now=5.0)
    assert rec.moves == [Migration(5.0, U_WEB, "web-01", "hv01", "hv02", MigrationSource.INVENTORY)]
    snap = state.snapshot()
    assert snap.resolve_vif(1, 1) is None  # the old (host, vif) is released
    assert snap.resolve_vif(1, 2) is None
    assert int(snap.resolve_vifs([2], [7])[0]) == nic  # the same vNIC index continues
    assert snap.vm("web-01").host == "hv02"  # type: ignore[union-attr]
    assert snap.vm("web-01").profile == "web"  # type: ignore[union-attr]
    host, vif = snap.nic_host_vif()
    assert (int(host[nic]), int(vif[nic])) == (2, 7)
    # hv01 registers again without it: not a removal (it already left), no second move.
    state.register(1, "hv01", [db()], now=6.0)
    assert len(rec.moves) == 1
    assert not [e for e in rec.events if e.kind == EventKind.VM_REMOVED]
    assert state.vm_host_history(U_WEB) == [(1.0, "hv01"), (5.0, "hv02")]
    assert state.migrations() == rec.moves
    assert state.migrations(since=5.5) == []


def test_a_vm_without_a_uuid_has_none_not_an_empty_one(rec: Recorder) -> None:
    # Regression (issue 17, point 1): snapshots gave UUID-less VMs (a Linux bridge's) the
    # UUID "", which the store then failed to cast. No UUID is None, whatever the
    # registration said ("" included), and the VM is found by name only.
    state = rec.state()
    state.register(1, "hv01", [db(uuid=None), PortInfo("web-01", 5, MAC_WEB, "", None)], now=1.0)
    snap = state.snapshot()
    assert {vm.name: vm.uuid for vm in snap.vms} == {"db-01": None, "web-01": None}
    assert snap.vm("") is None
    found = snap.vm("web-01")
    assert found is not None
    assert found.uuid is None
    assert [e.vm_uuid for e in rec.events if e.vm_name] == [None, None]


def test_migration_by_mac_when_no_uuid(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [db(uuid=None)], now=1.0)
    state.register(1, "hv01", [], now=2.0)  # the source lets go first
    state.register(2, "hv02", [PortInfo("db-01", 9, MAC_DB)], now=3.0)
    assert [(m.vm_uuid, m.vm_name, m.from_host, m.to_host) for m in rec.moves] == [
        (None, "db-01", "hv01", "hv02")
    ]
    vm = state.snapshot().resolve_vif(2, 9)
    assert vm is not None
    assert (vm.name, vm.uuid, vm.profile) == ("db-01", None, "db")
    # A UUID registered later for the same MAC is adopted, not a new VM.
    state.register(2, "hv02", [db(9)], now=4.0)
    assert len(state.snapshot().vms) == 1
    assert state.snapshot().vm(U_DB) is not None
    assert rec.events[-1].kind == EventKind.VM_CHANGED
    assert rec.events[-1].detail == f"uuid {U_DB}"


def test_dataplane_migration(rec: Recorder) -> None:
    state = rec.state(dataplane_hold_s=10.0)
    state.register(1, "hv01", [db()], now=100.0)
    state.register(2, "hv02", [app()], now=100.0)
    nic = int(state.resolve_macs([MAC_DB])[0])
    # Unknown MACs and unknown hosts are ignored; a sighting on its own host is no move.
    assert state.observe_dataplane({0x999: 2, MAC_DB: 9, MAC_APP: 2}, now=200.0) == []
    moves = state.observe_dataplane({MAC_DB: 2}, now=200.0, vif_of_mac={MAC_DB: 4})
    assert moves == [Migration(200.0, U_DB, "db-01", "hv01", "hv02", MigrationSource.DATAPLANE)]
    assert rec.moves == moves
    snap = state.snapshot()
    assert snap.resolve_vif(1, 3) is None
    assert int(snap.resolve_vifs([2], [4])[0]) == nic
    assert snap.vm(U_DB).host == "hv02"  # type: ignore[union-attr]
    # Right after a registration places it, stale sightings of the old host are held.
    state.register(1, "hv01", [db()], now=300.0)
    assert len(rec.moves) == 2
    assert state.observe_dataplane({MAC_DB: 2}, now=305.0) == []
    assert state.counters["dataplane_held"] == 1
    assert state.snapshot().vm(U_DB).host == "hv01"  # type: ignore[union-attr]
    assert len(state.observe_dataplane({MAC_DB: 2}, now=320.0)) == 1


def test_dataplane_without_vif_resolves_by_mac_only(rec: Recorder) -> None:
    state = rec.state(dataplane_hold_s=0.0)
    state.register(1, "hv01", [db()], now=1.0)
    state.register(2, "hv02", [app(3)], now=1.0)
    # vif 3 on hv02 is app-01's: db-01 does not take it.
    state.observe_dataplane({MAC_DB: 2}, now=2.0, vif_of_mac={MAC_DB: 3})
    snap = state.snapshot()
    assert snap.resolve_vif(2, 3).name == "app-01"  # type: ignore[union-attr]
    assert snap.resolve_mac(MAC_DB).host == "hv02"  # type: ignore[union-attr]


def test_history_events_in_order_and_bounded(rec: Recorder) -> None:
    state = rec.state(history_size=4)
    state.register(1, "hv01", [web()[0], db()], now=1.0)
    changed_db = PortInfo("db-01", 3, MAC_DB, U_DB, "pci", "vnet2")
    state.register(1, "hv01", [web(4)[0], changed_db], now=2.0)
    state.register(1, "hv01", [changed_db], now=3.0)
    state.register(2, "hv02", [web(1)[0]], now=4.0)
    got = [(e.time, e.kind, e.host, e.vm_name, e.detail) for e in rec.events]
    assert got == [
        (1.0, EventKind.HOST_ADDED, "hv01", None, "collector 1 (registration)"),
        (1.0, EventKind.VM_ADDED, "hv01", "web-01", "52:54:00:00:00:01 vif 1"),
        (1.0, EventKind.VM_ADDED, "hv01", "db-01", "52:54:00:00:00:02 vif 3"),
        (2.0, EventKind.VM_CHANGED, "hv01", "web-01", "vif 52:54:00:00:00:01 1→4"),
        (2.0, EventKind.VM_CHANGED, "hv01", "db-01", "profile db→pci"),
        (3.0, EventKind.VM_REMOVED, "hv01", "web-01", ""),
        (4.0, EventKind.HOST_ADDED, "hv02", None, "collector 2 (registration)"),
        (4.0, EventKind.VM_MIGRATED, "hv02", "web-01", "hv01→hv02 (inventory)"),
    ]
    assert state.history() == rec.events[-4:]  # the ring keeps the last 4
    assert [e.kind for e in state.history(since=4.0)] == [
        EventKind.HOST_ADDED,
        EventKind.VM_MIGRATED,
    ]
    # A registration that changes nothing records nothing.
    state.register(2, "hv02", [web(1)[0]], now=5.0)
    assert len(rec.events) == 8


def test_vm_back_on_its_host_is_no_migration(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [db()], now=1.0)
    state.register(1, "hv01", [], now=2.0)
    assert state.snapshot().resolve_mac(MAC_DB) is None
    assert state.snapshot().vm("db-01") is not None  # gone, but its vNIC still names it
    assert state.snapshot().present == (False,)
    state.register(1, "hv01", [db(4)], now=3.0)
    assert [(e.kind, e.detail) for e in rec.events[-3:]] == [
        (EventKind.VM_REMOVED, ""),
        (EventKind.VM_ADDED, "back"),
        (EventKind.VM_CHANGED, "vif 52:54:00:00:00:02 3→4"),
    ]
    assert rec.moves == []
    assert state.snapshot().resolve_vif(1, 4).name == "db-01"  # type: ignore[union-attr]
    assert state.vm_host_history("db-01") == [(1.0, "hv01"), (3.0, "hv01")]


def test_static_inventory_merged_with_registrations(rec: Recorder) -> None:
    static = Inventory.loads(
        f"""\
hosts:
  - {{name: hv01, collector_id: 1}}
  - {{name: hv02, collector_id: 2}}
vms:
  - name: web-01
    uuid: {U_WEB}
    host: hv01
    profile: web
    nics: [{{mac: "52:54:00:00:00:01", vif: 1, ips: ["10.1.0.1"]}}]
  - name: db-01
    uuid: {U_DB}
    host: hv02
    nics: [{{mac: "52:54:00:00:00:02", vif: 1}}]
"""
    )
    state = rec.state()
    state.add_static(static, now=0.0)
    assert state.snapshot().resolve_vif(2, 1).name == "db-01"  # type: ignore[union-attr]
    assert state.registrations() == {}
    # hv02's collector registers: db-01 gets a new vif, and web-01 (the file put it on
    # hv01) is found on hv02 — a migration.
    state.register(2, "hv02", [db(5), web(6)[0]], now=10.0)
    snap = state.snapshot()
    assert snap.resolve_vif(2, 1) is None
    assert snap.resolve_vif(2, 5).name == "db-01"  # type: ignore[union-attr]
    web_vm = snap.resolve_vif(2, 6)
    assert web_vm is not None
    assert web_vm.nics[0].ips == ("10.1.0.1",)  # what the file knew stays
    assert [(m.from_host, m.to_host) for m in rec.moves] == [("hv01", "hv02")]
    assert state.collector_view(1)[1] == ()
    assert [v.name for v in state.collector_view(2)[1]] == ["web-01", "db-01"]


def test_conflicting_registrations_are_refused(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [db()], now=1.0)
    with pytest.raises(
        RegistrationError,
        match=r"^host 'hv01' belongs to collector 1, not 2 "
        r"\(give each collector its own host name; an administrator removes a "
        r"collector that is gone with DELETE /api/v1/control/collectors/1\)$",
    ):
        state.register(2, "hv01", [], now=2.0)
    with pytest.raises(RegistrationError, match=r"^collector_id 0 out of range 1\.\.4294967295$"):
        state.register(0, "hv00", [], now=2.0)
    with pytest.raises(RegistrationError, match=r"vif 3 used by vnet2 and vnet7$"):
        state.register(3, "hv03", [db(3), app(3)], now=2.0)
    state.register(2, "hv02", [app()], now=3.0)
    with pytest.raises(RegistrationError, match=r"^host 'hv02' belongs to collector 2, not 1 "):
        state.register(1, "hv02", [db()], now=4.0)  # a rename onto a name taken
    assert [h.name for h in state.snapshot().hosts] == ["hv01", "hv02"]


def test_a_collector_renames_its_host_to_a_free_name(rec: Recorder) -> None:
    """The README's example without ``--host-name``: two hosts named ``vm``. The second is
    refused; the first, given its real name, renames its host (its VMs go with it, an event
    says so), and the second can then have ``vm``."""
    state = rec.state()
    state.register(22, "vm", [db()], now=1.0)
    with pytest.raises(RegistrationError, match=r"^host 'vm' belongs to collector 22, not 11 "):
        state.register(11, "vm", [app()], now=2.0)
    state.register(22, "h2", [db()], now=3.0)  # was: "collector 22 is host 'vm', not 'h2'"
    state.register(11, "vm", [app()], now=4.0)
    snap = state.snapshot()
    assert sorted((h.collector_id, h.name) for h in snap.hosts) == [(11, "vm"), (22, "h2")]
    assert [v.name for v in snap.vms_on("h2")] == ["db-01"]
    assert snap.resolve_vif(22, 3).host == "h2"  # type: ignore[union-attr]
    assert [v.name for v in snap.vms_on("vm")] == ["app-01"]
    renamed = [e for e in rec.events if e.kind == EventKind.HOST_RENAMED]
    assert [(e.time, e.host, e.detail) for e in renamed] == [(3.0, "h2", "collector 22: vm→h2")]
    assert rec.moves == []  # a rename is no migration
    assert state.counters["hosts_renamed"] == 1


def test_a_host_of_the_inventory_file_keeps_its_name(rec: Recorder) -> None:
    state = rec.state()
    state.add_static(Inventory.loads("hosts:\n  - {name: hv01, collector_id: 1}\n"), 0.0)
    with pytest.raises(
        RegistrationError,
        match=r"^collector 1 is host 'hv01' in the inventory "
        r"file, not 'vm': a registration does not rename a host the file names$",
    ):
        state.register(1, "vm", [], now=1.0)


def test_an_administrator_removes_a_collector_and_its_host(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "vm", [*web(), db()], now=1.0)
    state.record_heartbeat(1, Heartbeat(time=1.0, received=1.5, frames=9))
    host = state.remove_collector(1, now=2.0)
    assert (host.name, host.collector_id) == ("vm", 1)
    snap = state.snapshot()
    assert (snap.hosts, snap.present_vms()) == ((), ())
    assert snap.resolve_mac(MAC_DB) is None
    assert (state.registrations(), state.latest_heartbeats()) == ({}, {})
    with pytest.raises(UnknownCollectorError):
        state.collector_view(1)
    with pytest.raises(UnknownCollectorError):
        state.remove_collector(1, now=3.0)
    kinds = [(e.kind, e.vm_name) for e in rec.events if e.time == 2.0]
    assert kinds == [(EventKind.VM_REMOVED, "web-01"), (EventKind.VM_REMOVED, "db-01"),
                     (EventKind.HOST_REMOVED, None)]  # fmt: skip
    state.register(2, "vm", [db()], now=4.0)  # the name is free; db-01 is back, the same VM
    assert state.snapshot().vm(U_DB).host == "vm"  # type: ignore[union-attr]
    assert state.counters["hosts_removed"] == 1


def test_a_registration_does_not_change_what_the_inventory_file_says(rec: Recorder) -> None:
    """A collector token could move any VM with any profile: a VM of the file is still seen
    to migrate, but keeps the file's name and port-profile (counted and logged)."""
    state = rec.state()
    state.add_static(Inventory.loads(f"""
hosts:
  - {{name: hv01, collector_id: 1}}
  - {{name: hv02, collector_id: 2}}
vms:
  - name: web-01
    uuid: {U_WEB}
    host: hv01
    profile: web
    nics: [{{mac: "52:54:00:00:00:01", vif: 1}}]
  - name: db-01
    uuid: {U_DB}
    host: hv01
    nics: [{{mac: "52:54:00:00:00:02", vif: 2}}]
"""), now=0.0)  # fmt: skip
    hostile = [PortInfo("web-01", 7, MAC_WEB, U_WEB, "trusted", "vnet7"),
               PortInfo("renamed-db", 8, MAC_DB, None, "trusted", "vnet8")]  # fmt: skip
    state.register(2, "hv02", hostile, now=20.0)
    snap = state.snapshot()
    web_vm, db_vm = snap.vm(U_WEB), snap.resolve_mac(MAC_DB)
    assert web_vm is not None
    assert db_vm is not None
    assert (web_vm.host, web_vm.profile) == ("hv02", "web")  # moved; the file's profile
    assert (db_vm.name, db_vm.host, db_vm.profile) == ("db-01", "hv02", None)
    assert snap.vm("renamed-db") is None
    assert state.counters["static_overrides_refused"] == 2
    assert [(m.vm_name, m.to_host) for m in rec.moves] == [("web-01", "hv02"), ("db-01", "hv02")]
    learned = [PortInfo("app-01", 9, MAC_APP, U_APP, "trusted", "vnet9")]
    state.register(2, "hv02", [*hostile, *learned], now=30.0)  # a VM only collectors know
    assert state.snapshot().vm(U_APP).profile == "trusted"  # type: ignore[union-attr]


def test_duplicate_mac_across_hosts_is_an_event_and_newest_wins(rec: Recorder) -> None:
    state = rec.state()
    state.register(1, "hv01", [db()], now=1.0)
    state.register(2, "hv02", [PortInfo("clone", 1, MAC_DB, U_APP)], now=2.0)
    assert rec.events[-1].kind == EventKind.MAC_CONFLICT
    assert rec.events[-1].detail == "MAC 52:54:00:00:00:02 also on db-01 at hv01; clone wins"
    assert state.snapshot().resolve_mac(MAC_DB).name == "clone"  # type: ignore[union-attr]
    assert state.snapshot().resolve_vif(1, 3).name == "db-01"  # type: ignore[union-attr]
    assert rec.moves == []


def test_heartbeats_ring_and_unknown_collector(rec: Recorder) -> None:
    from vspan.analysis.inventory.state import Heartbeat

    state = rec.state(heartbeats_per_collector=2)
    with pytest.raises(UnknownCollectorError, match=r"^collector 1 is not registered"):
        state.record_heartbeat(1, Heartbeat(time=1.0, received=1.0))
    with pytest.raises(UnknownCollectorError):
        state.collector_view(1)
    state.register(1, "hv01", [], now=1.0)
    for t in (1.0, 2.0, 3.0):
        state.record_heartbeat(1, Heartbeat(time=t, received=t + 0.5, frames=int(t)))
    assert [h.frames for h in state.heartbeats(1)] == [2, 3]


def test_failing_sink_is_counted_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom(event: InventoryEvent) -> None:
        raise RuntimeError("store down")

    state = InventoryState(history_sink=boom)
    state.register(1, "hv01", [db()], now=1.0)
    assert state.counters["sink_errors"] == 2
    assert state.snapshot().resolve_vif(1, 3) is not None
    assert "inventory sink failed" in caplog.text


def test_readers_see_whole_snapshots_while_writers_register() -> None:
    state = InventoryState(InventoryConfig(dataplane_hold_s=0.0))
    state.register(1, "hv01", [db()], now=0.0)
    state.register(2, "hv02", [], now=0.0)
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            nics = state.resolve_macs([MAC_DB])
            host, _ = state.nic_host_vif()
            seen.append(int(host[nics[0]]) if nics[0] >= 0 else -1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            state.register(1 + i % 2, f"hv0{1 + i % 2}", [db(3 + i % 2)], now=float(i + 1))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert set(seen) <= {1, 2}
    assert len(state.migrations()) == 199  # every registration but the first moves it


def test_a_mac_learned_after_the_first_registration_keeps_the_vnic(rec: Recorder) -> None:
    """A Linux bridge VM is registered without a MAC, then with the MAC its collector
    learned from the traffic: the same vNIC gets it (its index, and so its flows, unchanged:
    on main a second vNIC replaced the first, splitting the flows open at that moment). A
    collector restarted, which has not learned it again, does not take it away."""
    state = rec.state()
    state.register(1, "hv01", [PortInfo("vm-a", 4, 0, None, None, "tap4")], now=1.0)
    nic = int(state.resolve_vifs([1], [4])[0])
    state.register(1, "hv01", [PortInfo("vm-a", 4, MAC_WEB, None, None, "tap4")], now=2.0)
    snap = state.snapshot()
    assert int(snap.resolve_vifs([1], [4])[0]) == nic
    assert int(snap.resolve_macs([MAC_WEB])[0]) == nic
    assert [(n.mac, n.vif) for n in snap.vm("vm-a").nics] == [(MAC_WEB, 4)]  # type: ignore[union-attr]
    assert (rec.events[-1].kind, rec.events[-1].detail) == (
        EventKind.VM_CHANGED, "nic vif 4 MAC 52:54:00:00:00:01",
    )  # fmt: skip
    state.register(1, "hv01", [PortInfo("vm-a", 4, 0, None, None, "tap4")], now=3.0)
    snap = state.snapshot()
    assert (int(snap.resolve_vifs([1], [4])[0]), int(snap.resolve_macs([MAC_WEB])[0])) == (nic, nic)
    assert rec.events[-1].kind == EventKind.VM_CHANGED  # nothing happened since
    assert len(rec.events) == 3  # host added, VM added, MAC
