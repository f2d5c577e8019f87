"""Tests of vspan.sessions: loading (YAML and JSON, line-numbered errors, filters
compiled by libpcap), selection of ports by VM identity, which follows a VM onto a new port,
sessions split by filter and by destination, and the merge of config and pushed sessions."""

from __future__ import annotations

import pytest

from vspan.errors import ConfigError
from vspan.inventory import Port
from vspan.sessions import (
    Destination,
    Direction,
    PortSelection,
    Selection,
    Session,
    SessionSet,
)

UUID_WEB = "6f1c2d9e-0000-4000-8000-000000000001"
PORTS = [
    Port("vnet0", 10, 5, 0x020000000005, "web-01", UUID_WEB, profile="web"),
    Port("vnet1", 11, 9, 0x020000000009, "db-01", None, profile="pci"),
    Port("vnet2", 12, 12, 0x02000000000C, "app-01", None, profile=None),
    Port("vnet3", 13, 0, 0, "web-02", None, profile="web"),  # no vif yet: never selected
]

CONFIG = """\
collector:
  id: 3
sessions:
  - name: web-debug
    vms: [web-01, "db-*"]
    direction: both
    filter: "tcp port 443"
    snaplen: 128
    sample: 10
    destination: "udp://10.0.0.5:47470"
  - name: pci
    profiles: [pci]
    direction: rx
    destination: "tcp://[2001:db8::1]"
"""


def test_load_yaml_with_every_field() -> None:
    sessions = SessionSet.loads_yaml(CONFIG, "collector.yaml").sessions
    assert sessions == (
        Session(
            name="web-debug",
            vms=("web-01", "db-*"),
            direction=Direction.BOTH,
            filter="tcp port 443",
            snaplen=128,
            sample=10,
            destination=Destination("10.0.0.5", 47470, "udp"),
        ),
        Session(
            name="pci",
            profiles=("pci",),
            direction=Direction.RX,
            destination=Destination("2001:db8::1", 47470, "tcp"),
        ),
    )


def test_no_sessions() -> None:
    assert SessionSet.loads_yaml("collector: {id: 1}\n").sessions == ()
    assert SessionSet.loads_yaml("sessions:\n").sessions == ()


BAD = [
    ("  - name: s\n    vms: [a]\n    directon: rx\n", 3, "sessions[0].directon", "unknown field"),
    (
        "  - name: s\n    vms: [a]\n    direction: in\n",
        3,
        "sessions[0].direction",
        "unknown direction 'in'; expected one of both, rx, tx",
    ),
    (
        "  - name: s\n    vms: [a]\n    snaplen: 10\n",
        3,
        "sessions[0].snaplen",
        "snaplen 10 below 14; 0 keeps all",
    ),
    (
        "  - name: s\n    vms: [a]\n    sample: 0\n",
        3,
        "sessions[0].sample",
        "0 out of range 1..1073741824",
    ),
    (
        "  - name: s\n    direction: rx\n",
        1,
        "sessions[0]",
        "session 's' selects nothing: give 'vms' or 'profiles'",
    ),
    (
        "  - name: s\n    vms: [a]\n  - name: s\n    vms: [b]\n",
        3,
        "sessions[1].name",
        "duplicate session name 's'",
    ),
    (
        "  - name: s\n    vms: [a]\n    destination: sctp://h:1\n",
        3,
        "sessions[0].destination",
        "transport 'sctp', expected udp or tcp",
    ),
    (
        "  - name: s\n    vms: [a]\n    destination: h:99999\n",
        3,
        "sessions[0].destination",
        "Port out of range 0-65535",
    ),
    ('  - name: s\n    vms: [""]\n', 2, "sessions[0].vms[0]", "expected a non-empty string"),
    (
        "  - name: s\n    vms: [a]\n    filter: udp port banana\n",
        3,
        "sessions[0].filter",
        "bad capture filter 'udp port banana': ",
    ),
    (
        "  - name: s\n    vms: [a]\n    filter: [udp]\n",
        3,
        "sessions[0].filter",
        "expected a non-empty string",
    ),
]


@pytest.mark.parametrize(("body", "line", "field", "message"), BAD)
def test_yaml_errors_name_file_line_and_field(
    body: str, line: int, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        SessionSet.loads_yaml("sessions:\n" + body, "c.yaml")
    assert (info.value.path, info.value.line, info.value.field) == ("c.yaml", line + 1, field)
    assert message in str(info.value)


def test_json_from_the_control_plane() -> None:
    doc = """{"sessions": [
      {"name": "a", "vms": ["6F1C2D9E-0000-4000-8000-000000000001"], "direction": "tx",
       "snaplen": 0, "sample": 1, "filter": null, "destination": null}
    ]}"""
    (session,) = SessionSet.loads_json(doc.replace('"filter": null, ', "")).sessions
    assert session.vms == (UUID_WEB,)  # canonical form
    assert session.direction is Direction.TX
    assert session.destination is None
    as_list = SessionSet.loads_json(b'[{"name": "b", "profiles": ["web"]}]').sessions
    assert as_list == (Session("b", profiles=("web",)),)


def test_decoded_json_value() -> None:
    value = [{"name": "a", "vms": ["web-01"], "direction": "rx"}]
    assert SessionSet.from_json_value(value).sessions == (
        Session("a", vms=("web-01",), direction=Direction.RX),
    )
    with pytest.raises(ConfigError) as info:
        SessionSet.from_json_value([{"name": "a", "vms": ["x"], "sample": 0}], "api")
    assert (info.value.path, info.value.field) == ("api", "[0].sample")
    with pytest.raises(ConfigError, match=r"^api: not a JSON value"):
        SessionSet.from_json_value({"a": object()}, "api")


def test_json_errors_have_lines() -> None:
    with pytest.raises(ConfigError, match=r"^api:3: JSON syntax: ") as info:
        SessionSet.loads_json('[\n  {"name": "a",\n   "vms": [}\n]', "api")
    assert info.value.line == 3
    with pytest.raises(ConfigError) as info:
        SessionSet.loads_json('[\n  {"name": "a",\n   "vms": ["x"], "sample": -1}\n]', "api")
    assert (info.value.line, info.value.field) == (3, "[0].sample")
    with pytest.raises(ConfigError, match="expected a list or an object, got str"):
        SessionSet.loads_json('"hello"', "api")
    with pytest.raises(ConfigError, match="unknown field"):
        SessionSet.loads_json('{"session": []}', "api")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", Destination("10.0.0.5", 47470, "udp")),
        ("analyzer:9000", Destination("analyzer", 9000, "udp")),
        ("tcp://analyzer", Destination("analyzer", 47470, "tcp")),
        ("udp://[::1]:5", Destination("::1", 5, "udp")),
    ],
)
def test_destination_parse(text: str, expected: Destination) -> None:
    assert Destination.parse(text) == expected


def per_port(selections: tuple[Selection, ...]) -> dict[str, PortSelection]:
    """The ports the selections select (each once: the sessions here share no filter)."""
    out: dict[str, PortSelection] = {}
    for sel in selections:
        assert not set(out) & set(sel.per_port)
        out.update(sel.per_port)
    return out


@pytest.mark.parametrize(
    ("session", "selected"),
    [
        (Session("s", vms=("web-01",)), {"vnet0"}),
        (Session("s", vms=(UUID_WEB,)), {"vnet0"}),
        (Session("s", vms=("*-01",)), {"vnet0", "vnet1", "vnet2"}),
        (Session("s", vms=("db-0[0-9]",)), {"vnet1"}),
        (Session("s", profiles=("web",)), {"vnet0"}),  # web-02 has no vif yet
        (Session("s", profiles=("p*",)), {"vnet1"}),
        (Session("s", vms=("nobody",)), set()),
    ],
)
def test_select_by_name_uuid_pattern_profile(session: Session, selected: set[str]) -> None:
    assert set(per_port(SessionSet([session]).selections(PORTS))) == selected


def test_merge_of_several_sessions_on_one_port() -> None:
    (sel,) = SessionSet(
        [
            Session("a", vms=("web-01",), direction=Direction.TX, snaplen=64, sample=10),
            Session("b", profiles=("web",), direction=Direction.RX, snaplen=128, sample=4),
            Session("c", vms=("web-*",), direction=Direction.RX),
        ]
    ).selections(PORTS)
    assert sel.per_port["vnet0"] == PortSelection(
        rx=True, tx=True, both=False, snaplen=0, sample=1, sessions=("a", "b", "c")
    )
    assert sel.filter is None
    assert (bool(sel.rx[5]), bool(sel.tx[5]), bool(sel.both[5])) == (True, True, False)
    assert (int(sel.snaplen[5]), int(sel.sample[5])) == (0, 1)
    assert not sel.rx[9]
    assert not sel.tx[9]
    (two,) = SessionSet(
        [
            Session("a", vms=("db-01",), direction=Direction.BOTH, snaplen=64, sample=10),
            Session("b", vms=("db-01",), direction=Direction.TX, snaplen=128, sample=4),
        ]
    ).selections(PORTS)
    assert (bool(two.both[9]), int(two.snaplen[9]), int(two.sample[9])) == (True, 128, 4)


def test_sessions_with_different_filters_stay_apart() -> None:
    """One selection per distinct filter (the filterless ones together), in first-use order;
    a filter selecting no port is left out."""
    parts = SessionSet(
        [
            Session("a", vms=("web-01",), direction=Direction.TX, filter="udp"),
            Session("b", profiles=("web",), direction=Direction.RX, snaplen=128),
            Session("c", vms=("web-*",), direction=Direction.RX, filter="udp"),
            Session("d", vms=("db-01",), filter="tcp port 443"),
            Session("e", vms=("nobody",), filter="icmp"),
        ]
    ).selections(PORTS)
    assert [None if p.filter is None else p.filter.expression for p in parts] == [
        "udp",
        None,
        "tcp port 443",
    ]
    udp, plain, tls = parts
    assert udp.per_port == {
        "vnet0": PortSelection(True, True, False, 0, 1, ("udp",), ("a", "c")),
    }
    assert plain.per_port == {"vnet0": PortSelection(True, False, False, 128, 1, (), ("b",))}
    assert set(tls.per_port) == {"vnet1"}
    assert SessionSet([Session("e", vms=("nobody",))]).selections(PORTS) == ()


def test_sessions_follow_the_vm_to_a_new_port() -> None:
    """After a live migration the VM shows up on another port, with another vif."""
    sessions = SessionSet([Session("s", vms=(UUID_WEB,), direction=Direction.RX)])
    (before,) = sessions.selections(PORTS)
    assert set(before.per_port) == {"vnet0"}
    moved = [p for p in PORTS if p.name != "vnet0"]
    assert sessions.selections(moved) == ()
    back = [*moved, Port("vnet7", 17, 33, 0x020000000005, "web-01", UUID_WEB.upper())]
    (after,) = sessions.selections(back)
    assert set(after.per_port) == {"vnet7"}
    assert bool(after.rx[33])
    assert not after.rx[5]


def test_destinations_split_the_sessions() -> None:
    sessions = SessionSet.loads_yaml(CONFIG)
    a = Destination("10.0.0.5", 47470, "udp")
    b = Destination("2001:db8::1", 47470, "tcp")
    assert sessions.destinations() == [a, b]
    assert [s.name for s in sessions.for_destination(a).sessions] == ["web-debug"]
    assert sessions.for_destination(None).sessions == ()
    routes = sessions.routes(PORTS)
    assert list(routes) == [a, b]  # no route None: no session without a destination
    (to_a,) = routes[a]
    assert set(to_a.per_port) == {"vnet0", "vnet1"}
    assert to_a.filter is not None
    assert to_a.filter.expression == "tcp port 443"
    (to_b,) = routes[b]
    assert set(to_b.per_port) == {"vnet1"}


def test_pushed_sessions_join_the_configured_ones_and_win_a_name() -> None:
    local = SessionSet([Session("a", vms=("web-01",)), Session("b", vms=("db-01",))])
    pushed = SessionSet([Session("b", vms=("app-01",)), Session("c", profiles=("web",))])
    merged = local.merged(pushed)
    assert [(s.name, s.vms) for s in merged.sessions] == [
        ("a", ("web-01",)),
        ("b", ("app-01",)),
        ("c", ()),
    ]
    assert local.merged(SessionSet()).sessions == local.sessions
    assert SessionSet().merged(pushed).sessions == pushed.sessions


def test_an_empty_filter_is_no_filter() -> None:
    (session,) = SessionSet.loads_yaml('sessions:\n  - {name: s, vms: [a], filter: " "}\n').sessions
    assert session.filter is None
