"""Tests of vspan.collectors.discovery.vifs: persistent vif numbers per port identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vspan.collectors.discovery.vifs import VifsExhaustedError, VifTable, port_identity
from vspan.errors import ConfigError
from vspan.inventory import Port


def new(ids: list[str]) -> list[tuple[str, int | None]]:
    return [(i, None) for i in ids]


def test_identity_is_vm_uuid_and_mac_else_port_name() -> None:
    uid = "6F1C2D9E-0000-4000-8000-000000000001"
    assert port_identity(Port("vnet0", 3, 0, 0x525400000001, "web", uid)) == (
        "vm:6f1c2d9e-0000-4000-8000-000000000001/525400000001"
    )
    assert port_identity(Port("vnet0", 3, 0, 0, "web", uid)) == "port:vnet0"
    assert port_identity(Port("veth1", 3, 0, 0x525400000001, "ns1")) == "port:veth1"


def test_lowest_free_vifs_survive_a_restart(tmp_path: Path) -> None:
    table = VifTable(tmp_path)
    assert table.assign(new(["a", "b", "c"])) == {"a": 1, "b": 2, "c": 3}
    again = VifTable(tmp_path)  # a restarted collector
    assert again.assign(new(["c", "a", "d"])) == {"c": 3, "a": 1, "d": 4}
    assert again.snapshot() == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_a_port_that_comes_back_gets_its_vif(tmp_path: Path) -> None:
    table = VifTable(tmp_path)
    table.assign(new(["a", "b"]))
    assert table.assign(new(["b"])) == {"b": 2}
    assert table.assign(new(["x"])) == {"x": 3}  # a's number stays reserved
    assert table.assign(new(["a", "b", "x"])) == {"a": 1, "b": 2, "x": 3}


def test_explicit_vif_wins_and_the_old_holder_moves(tmp_path: Path) -> None:
    table = VifTable(tmp_path)
    table.assign(new(["a", "b"]))
    assert table.assign([("a", None), ("b", None), ("s", 1)]) == {"a": 3, "b": 2, "s": 1}
    assert table.assign([("s", 7)]) == {"s": 7}  # the static file changed its vif
    assert table.snapshot() == {"a": 3, "b": 2, "s": 7}
    assert VifTable(tmp_path).lookup("s") == 7


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ([("a", 0)], "a: explicit vif 0 out of range 1..4095"),
        ([("a", 4096)], "a: explicit vif 4096 out of range 1..4095"),
        ([("a", 3), ("b", 3)], "vif 3 claimed by both 'a' and 'b'"),
        ([("a", None), ("a", None)], "port identity 'a' listed twice"),
    ],
)
def test_bad_requests(tmp_path: Path, wanted: list[tuple[str, int | None]], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        VifTable(tmp_path).assign(wanted)


def test_exhaustion_reclaims_the_least_recently_seen_absent_entry(tmp_path: Path) -> None:
    table = VifTable(tmp_path)
    ids = [f"p{i}" for i in range(4095)]
    assert table.assign(new(ids))["p4094"] == 4095
    table.assign(new(ids[10:]))  # p0..p9 absent now, last seen in generation 1
    table.assign(new(ids[5:]))  # p5..p9 seen again: p0..p4 are the oldest
    got = table.assign(new([*ids[5:], "q1", "q2"]))
    assert (got["q1"], got["q2"]) == (1, 2)  # p0 and p1: oldest, then by name
    assert len(table) == 4095
    with pytest.raises(VifsExhaustedError, match=r"^4096 ports present, only 4095 vifs exist$"):
        table.assign(new([f"z{i}" for i in range(4096)]))


def test_state_file_is_written_atomically_and_only_on_change(tmp_path: Path) -> None:
    state = tmp_path / "state"
    table = VifTable(state)
    table.assign(new(["a"]))
    table.assign(new(["a"]))
    assert table.writes == 1
    doc = json.loads((state / "vifs.json").read_text())
    assert doc["version"] == 1
    assert doc["vifs"] == [{"identity": "a", "vif": 1, "seen": 1}]
    assert [p.name for p in state.iterdir()] == ["vifs.json"]  # no temporary file left


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"version": 2, "generation": 0, "vifs": []}',
        '{"version": 1, "generation": 0, "vifs": [{"identity": "a", "vif": 0, "seen": 0}]}',
        '{"version": 1, "generation": 0, "vifs": [{"identity": "a", "vif": 1, "seen": 0},'
        ' {"identity": "b", "vif": 1, "seen": 0}]}',
        "[]",
    ],
)
def test_corrupt_state_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "vifs.json").write_text(content)
    with pytest.raises(ConfigError, match=r"vifs\.json: corrupt vif state") as info:
        VifTable(tmp_path).assign(new(["a"]))
    assert info.value.path == str(tmp_path / "vifs.json")
