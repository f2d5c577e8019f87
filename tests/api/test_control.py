"""The control plane over real HTTP: uvicorn on 127.0.0.1, driven by ControlClient and urllib."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import pytest

from vspan.analysis.inventory.state import InventoryState
from vspan.api.control import PREFIX, create_control_app
from vspan.collectors.control.client import ControlClient, ControlError
from vspan.inventory import Host, Inventory, Port, Vm
from vspan.sessions import SessionSet
from vspan_testing.readstore import serve

U_WEB = "6f1c2d9e-0000-4000-8000-000000000001"
U_DB = "6f1c2d9e-0000-4000-8000-000000000002"
WEB = Port("vnet0", 11, 1, 0x525400000001, "web-01", U_WEB, "web", "br0")
DB = Port("vnet1", 12, 2, 0x525400000002, "db-01", U_DB.upper(), "pci", "br0")


class Clock:
    """The analyzer's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sessions_for(host: Host, vms: Sequence[Vm]) -> list[dict[str, Any]]:
    if not vms:
        return []
    return [{"name": f"all-{host.name}", "vms": [v.uuid for v in vms], "snaplen": 128}]


def profiles_for(host: Host, vms: Sequence[Vm]) -> list[dict[str, Any]]:
    return [{"name": p, "rules": []} for p in sorted({v.profile for v in vms if v.profile})]


@dataclass
class Served:
    url: str
    state: InventoryState
    clock: Clock

    def client(self, collector_id: int) -> ControlClient:
        return ControlClient(self.url, collector_id, timeout=5.0)

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        """(status, JSON) of a raw request; errors are answers too."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + PREFIX + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture
def served() -> Iterator[Served]:
    state, clock = InventoryState(), Clock()
    app = create_control_app(
        state, sessions_for=sessions_for, profiles_for=profiles_for, now=clock,
        sessions_total=lambda: 5,  # the analyzer's sessions for every host
    )  # fmt: skip
    with serve(app) as url:
        yield Served(url, state, clock)


def test_register_answers_with_the_collectors_config(served: Served) -> None:
    config = served.client(1).register("hv01", [WEB, DB])
    assert config == {
        "collector_id": 1,
        "host": "hv01",
        "vms": 2,
        "sessions": [{"name": "all-hv01", "vms": [U_WEB, U_DB], "snaplen": 128}],
        "sessions_total": 5,
        "profiles": [{"name": "pci", "rules": []}, {"name": "web", "rules": []}],
    }
    vm = served.state.snapshot().resolve_vif(1, 2)
    assert vm is not None
    assert (vm.name, vm.uuid, vm.profile) == ("db-01", U_DB, "pci")  # UUID made canonical


def test_sessions_and_profiles_feed_the_collectors_session_parser(served: Served) -> None:
    client = served.client(1)
    client.register("hv01", [WEB])
    sessions = client.sessions()
    assert sessions == [{"name": "all-hv01", "vms": [U_WEB], "snaplen": 128}]
    parsed = SessionSet.loads_json(json.dumps({"sessions": sessions}))
    (selection,) = parsed.selections([WEB])
    assert selection.per_port["vnet0"].snaplen == 128
    assert client.profiles() == [{"name": "web", "rules": []}]
    want = {"sessions": sessions, "sessions_total": 5, "registered": True}
    assert served.call("GET", "/collectors/1/sessions") == (200, want)
    assert client.session_state() == want


def test_heartbeat_is_kept_per_collector(served: Served) -> None:
    client = served.client(3)
    client.register("hv03", [])
    served.clock.now = 1010.0
    client.heartbeat({"time": 1009.5, "frames": 10, "bytes": 900, "truncated": 1,
                      "drops": {"queue_full": 2}, "not_mirrored": {"duplicates": 4},
                      "per_port": {"vnet0": 10}})  # fmt: skip
    served.clock.now = 1020.0
    assert served.call("POST", "/collectors/3/heartbeat", {"time": 1019.0, "frames": 12}) == (
        200,
        {"collector_id": 3, "received": 1020.0},
    )
    beats = served.state.heartbeats(3)
    assert [(b.time, b.received, b.frames) for b in beats] == [
        (1009.5, 1010.0, 10),
        (1019.0, 1020.0, 12),
    ]
    assert (beats[0].drops, beats[0].not_mirrored) == ({"queue_full": 2}, {"duplicates": 4})
    assert beats[0].per_port == {"vnet0": 10}


def test_heartbeats_of_older_collectors_are_sorted_into_losses_and_choices(
    served: Served,
) -> None:
    """A collector from before issue 17 mixes losses and frames left out on purpose in
    ``dropped``: the analyzer keeps them apart."""
    served.client(3).register("hv03", [])
    old = {"time": 1.0, "frames": 90, "kernel_drops": 3, "sampled_out": 5,
           "dropped": {"duplicates": 40, "filtered": 2, "queue_full": 7}}  # fmt: skip
    assert served.call("POST", "/collectors/3/heartbeat", old)[0] == 200
    beat = served.state.heartbeats(3)[-1]
    assert beat.drops == {"kernel": 3, "queue_full": 7}
    assert beat.not_mirrored == {"duplicates": 40, "filtered": 2, "sampled_out": 5}


def test_inventory_and_migrations_after_a_move(served: Served) -> None:
    served.client(1).register("hv01", [WEB, DB])
    served.clock.now = 1100.0
    moved = Port("vnet9", 40, 7, WEB.mac, "web-01", U_WEB, None, "br-int")
    config = served.client(2).register("hv02", [moved])
    assert config["profiles"] == [{"name": "web", "rules": []}]  # the profile followed it
    status, doc = served.call("GET", "/inventory")
    assert status == 200
    assert doc == {
        "hosts": [
            {"name": "hv01", "collector_id": 1, "registered": 1000.0},
            {"name": "hv02", "collector_id": 2, "registered": 1100.0},
        ],
        "vms": [
            {
                "name": "web-01",
                "uuid": U_WEB,
                "host": "hv02",
                "profile": "web",
                "nics": [{"mac": "52:54:00:00:00:01", "vif": 7, "ips": []}],
            },
            {
                "name": "db-01",
                "uuid": U_DB,
                "host": "hv01",
                "profile": "pci",
                "nics": [{"mac": "52:54:00:00:00:02", "vif": 2, "ips": []}],
            },
        ],
    }
    move = {
        "time": 1100.0,
        "vm_uuid": U_WEB,
        "vm_name": "web-01",
        "from_host": "hv01",
        "to_host": "hv02",
        "source": "inventory",
    }
    assert served.call("GET", "/migrations") == (200, {"migrations": [move]})
    assert served.call("GET", "/migrations?since=1100.5") == (200, {"migrations": []})
    assert served.client(1).sessions() == [{"name": "all-hv01", "vms": [U_DB], "snaplen": 128}]


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (
            "/collectors/0/register",
            {"host": "hv00", "ports": []},
            "Input should be greater than or equal to 1",
        ),
        ("/collectors/1/register", {"ports": []}, "Field required"),
        (
            "/collectors/1/register",
            {"host": "hv01", "ports": [{"vif": 4096, "vm_name": "x"}]},
            "Input should be less than or equal to 4095",
        ),
        (
            "/collectors/1/register",
            {"host": "hv01", "ports": [{"vif": 1, "vm_name": "x", "mac": "52:54:00:00:01"}]},
            "Value error, expected a MAC address like 52:54:00:12:34:56, got '52:54:00:00:01'",
        ),
        (
            "/collectors/1/register",
            {"host": "hv01", "ports": [{"vif": 1, "vm_name": "x", "vm_uuid": "nope"}]},
            "Value error, expected a UUID, got 'nope'",
        ),
        (
            "/collectors/1/register",
            {
                "host": "hv01",
                "ports": [
                    {"name": "vnet0", "vif": 3, "vm_name": "a"},
                    {"name": "vnet1", "vif": 3, "vm_name": "b"},
                ],
            },
            "Value error, vif 3 used by ports vnet0 and vnet1",
        ),
        (
            "/collectors/1/heartbeat",
            {"time": 1.0, "frames": -1},
            "Input should be greater than or equal to 0",
        ),
        ("/collectors/1/heartbeat", {"time": 1.0, "frame": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_422_with_a_reason(
    served: Served, path: str, body: dict[str, Any], reason: str
) -> None:
    status, doc = served.call("POST", path, body)
    assert status == 422
    assert reason in [item["msg"] for item in doc["detail"]]
    assert served.state.snapshot().hosts == ()


def test_collector_id_zero_and_broken_json_are_422(served: Served) -> None:
    status, doc = served.call("GET", "/collectors/0/sessions")
    assert status == 422
    assert doc["detail"][0]["loc"] == ["path", "collector_id"]
    status, doc = served.call("POST", "/collectors/1/register", raw=b"{not json")
    assert status == 422
    assert doc["detail"][0]["type"] == "json_invalid"


def test_a_host_renamed_then_removed_by_an_administrator(served: Served) -> None:
    """Two collectors on hosts both called ``vm`` (the README's example without
    ``--host-name``): the first renames its host to its real name, which frees ``vm``; an
    administrator removes a collector that is gone, and its name is free again."""
    served.client(22).register("vm", [WEB])
    with pytest.raises(ControlError, match="host 'vm' belongs to collector 22, not 11"):
        served.client(11).register("vm", [])
    assert served.client(22).register("h2", [WEB])["host"] == "h2"  # was 409
    assert served.client(11).register("vm", [DB])["host"] == "vm"
    hosts = served.call("GET", "/inventory")[1]["hosts"]
    assert sorted((h["collector_id"], h["name"]) for h in hosts) == [(11, "vm"), (22, "h2")]
    assert served.call("DELETE", "/collectors/11") == (204, None)
    reason = {"detail": "collector 11 is not registered; register it first"}
    assert served.call("DELETE", "/collectors/11") == (404, reason)
    assert served.call("GET", "/collectors/11/sessions") == (404, reason)
    assert [h["name"] for h in served.call("GET", "/inventory")[1]["hosts"]] == ["h2"]
    assert served.client(33).register("vm", [DB])["host"] == "vm"  # the name is free


def test_a_host_of_the_inventory_file_is_known_before_it_registers(served: Served) -> None:
    """An analyzer restarted with an inventory file knows the file's hosts, not their ports:
    its answer says so, and the collector registers again."""
    served.state.add_static(Inventory.loads("hosts:\n  - {name: hv01, collector_id: 1}\n"), 0.0)
    want = {"sessions": [], "sessions_total": 5, "registered": False}
    assert served.client(1).session_state() == want
    served.client(1).register("hv01", [WEB])
    assert served.client(1).session_state()["registered"] is True


def test_unknown_collector_is_404_with_a_reason(served: Served) -> None:
    reason = {"detail": "collector 9 is not registered; register it first"}
    assert served.call("POST", "/collectors/9/heartbeat", {"time": 1.0}) == (404, reason)
    assert served.call("GET", "/collectors/9/sessions") == (404, reason)
    assert served.call("GET", "/collectors/9/profiles") == (404, reason)
    with pytest.raises(ControlError) as caught:
        served.client(9).heartbeat({"time": 1.0})
    assert caught.value.status == 404
    assert str(caught.value) == (
        f"control plane {served.url}: POST /api/v1/control/collectors/9/heartbeat: "
        "HTTP 404 Not Found: collector 9 is not registered; register it first"
    )


def test_client_errors_name_status_and_reason(served: Served) -> None:
    served.client(1).register("hv01", [])
    with pytest.raises(ControlError) as caught:
        served.client(2).register("hv01", [])
    assert caught.value.status == 409
    assert str(caught.value).endswith(
        "HTTP 409 Conflict: host 'hv01' belongs to collector 1, not 2 (give each collector its "
        "own host name; an administrator removes a collector that is gone with DELETE "
        "/api/v1/control/collectors/1)"
    )
    bad = Port("vnet0", 0, 4096, 0, "x")
    with pytest.raises(ControlError) as caught:
        served.client(1).register("hv01", [bad])
    assert caught.value.status == 422
    assert str(caught.value).endswith(
        f"HTTP 422 {HTTPStatus(422).phrase}: ports.0.vif: Input should be less than or equal to 4095"
    )


def test_client_says_connection_refused() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ControlClient(f"http://127.0.0.1:{port}", 1, timeout=2.0)
    with pytest.raises(ControlError) as caught:
        client.sessions()
    assert caught.value.status is None
    assert str(caught.value) == (
        f"control plane http://127.0.0.1:{port}: GET /api/v1/control/collectors/1/sessions: "
        "connection refused (is the analyzer running?)"
    )
