"""Loading port-profiles: both rule forms, every error pinned with its file, line, field,
profile and rule, and the bindings of VMs (with their warnings)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.policy.acl import ANY, Action, PortMatch, PortOp, Prefix, ProfileRef, Rule
from vspan.analysis.policy.profiles import Origin, bind, load_policy, loads_policy
from vspan.errors import PolicyError
from vspan.inventory import Inventory
from vspan.synth import generate_small

EXAMPLE = Path(__file__).parents[3] / "docs" / "examples" / "profiles.yaml"
DB_UUID = "6f1c2d9e-0000-4000-8000-000000000003"

GOOD = f"""\
profiles:
  - name: web
    description: Public web front ends
    default: deny
    vms: [web-*]
    rules:
      - permit tcp any profile:web eq 443
      - permit tcp profile:web profile:app eq 8080
      - action: permit
        protocol: udp
        destination: any
        ports: [53, "eq 123"]
        name: dns-and-ntp
  - name: app
    default: permit
    rules:
      - deny tcp any 198.51.100.0/24
  - name: db
    vms: [db-01, {DB_UUID}]
    rules:
      - action: permit
        protocol: tcp
        source: profile:app
        ports: 5432
        remark: db accepts 5432 only from app
      - action: permit
        protocol: icmp
        icmp_type: echo
"""


def test_both_forms_load_into_rules() -> None:
    policy = loads_policy(GOOD, "f.yaml")
    web, app, db = policy.profiles
    assert (web.name, web.description, web.default, web.vms) == (
        "web", "Public web front ends", Action.DENY, ("web-*",)
    )  # fmt: skip
    assert web.rules[2] == Rule(
        Action.PERMIT,
        17,
        ANY,
        ANY,
        ports=(PortMatch(PortOp.EQ, 53), PortMatch(PortOp.EQ, 123)),
        name="dns-and-ntp",
    )
    assert app.default is Action.PERMIT
    assert app.rules == (
        Rule(Action.DENY, 6, ANY, Prefix(ipaddress.ip_network("198.51.100.0/24"))),
    )
    assert db.default is Action.DENY  # NX-OS's implicit deny when left out
    assert db.rules[0] == Rule(
        Action.PERMIT,
        6,
        ProfileRef("app"),
        ANY,
        ports=(PortMatch(PortOp.EQ, 5432),),
        remark="db accepts 5432 only from app",
    )
    assert db.rules[1] == Rule(Action.PERMIT, 1, icmp_type=8)
    assert db.rule_origins[1] == Origin("f.yaml", 26, "profiles[2].rules[1]")
    assert db.vm_origins == (
        Origin("f.yaml", 19, "profiles[2].vms[0]"),
        Origin("f.yaml", 19, "profiles[2].vms[1]"),
    )
    assert policy.profile("app") is app
    assert policy.profile("nope") is None


def test_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(GOOD)
    assert [p.name for p in load_policy(str(path)).profiles] == ["web", "app", "db"]
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read: No such file"):
        load_policy(str(tmp_path / "missing.yaml"))


# (old text, new text, the whole message)
BAD = [
    (
        "permit tcp any profile:web eq 443",
        "permit tpc any profile:web eq 443",
        "f.yaml:7: profiles[0].rules[0]: profile 'web' rule 1: unknown protocol 'tpc'",
    ),
    (
        "protocol: udp",
        "protocol: tpc",
        "f.yaml:10: profiles[0].rules[2].protocol: profile 'web' rule 3: unknown protocol 'tpc'",
    ),
    (
        "default: permit",
        "default: allow",
        "f.yaml:15: profiles[1].default: profile 'app': expected 'permit' or 'deny', got 'allow'",
    ),
    (
        "  - name: db",
        "  - name: web",
        "f.yaml:18: profiles[2].name: duplicate profile name 'web' (first at line 2)",
    ),
    (
        "  - name: web",
        "  - name: my web",
        "f.yaml:2: profiles[0].name: bad profile name 'my web': use letters, digits, _ . and -",
    ),
    (
        "source: profile:app",
        "source: profile:ap",
        "f.yaml:23: profiles[2].rules[0].source: profile 'db' rule 1: unknown profile 'ap' in"
        " the source; profiles are web, app, db",
    ),
    (
        "profile:web profile:app eq 8080",
        "profile:web profile:apps eq 8080",
        "f.yaml:8: profiles[0].rules[1]: profile 'web' rule 2: unknown profile 'apps' in the"
        " destination; profiles are web, app, db",
    ),
    (
        "ports: 5432",
        'ports: "range 5432 5000"',
        "f.yaml:24: profiles[2].rules[0].ports: profile 'db' rule 1: port range out of order:"
        " 5432 > 5000",
    ),
    (
        "ports: 5432",
        "ports: 70000",
        "f.yaml:24: profiles[2].rules[0].ports: profile 'db' rule 1: port 70000 out of range"
        " 0..65535",
    ),
    (
        "ports: 5432",
        "ports: [5432, foo]",
        "f.yaml:24: profiles[2].rules[0].ports: profile 'db' rule 1: bad port 'foo'",
    ),
    (
        "ports: 5432",
        'ports: "5432 5433"',
        "f.yaml:24: profiles[2].rules[0].ports: profile 'db' rule 1: expected a port or"
        " 'OP PORT', got '5432 5433'",
    ),
    (
        "ports: 5432",
        "ports: true",
        "f.yaml:24: profiles[2].rules[0].ports: profile 'db' rule 1: bad port 'True'",
    ),
    (
        "deny tcp any 198.51.100.0/24",
        "deny tcp any 198.51.100.1/24",
        "f.yaml:17: profiles[1].rules[0]: profile 'app' rule 1: bad prefix '198.51.100.1/24':"
        " host bits set; did you mean 198.51.100.0/24?",
    ),
    (
        "destination: any",
        "destination: 10.0.0.0/33",
        "f.yaml:11: profiles[0].rules[2].destination: profile 'web' rule 3: bad prefix"
        " '10.0.0.0/33'",
    ),
    (
        "destination: any",
        "destination: any any",
        "f.yaml:11: profiles[0].rules[2].destination: profile 'web' rule 3: unexpected 'any'"
        " after the destination address",
    ),
    (
        "        destination: any",
        "        source: 10.0.0.0/8\n        destination: fd00::/8",
        "f.yaml:9: profiles[0].rules[2]: profile 'web' rule 3: source 10.0.0.0/8 and"
        " destination fd00::/8 are of different IP families; the rule can never match",
    ),
    (
        "name: dns-and-ntp",
        "nam: dns-and-ntp",
        "f.yaml:13: profiles[0].rules[2].nam: profile 'web' rule 3: unknown field; expected one"
        " of action, destination, icmp_code, icmp_type, name, ports, protocol, remark, source,"
        " source_ports",
    ),
    (
        "      - action: permit\n        protocol: udp",
        "      - protocol: udp",
        "f.yaml:9: profiles[0].rules[2]: profile 'web' rule 3: missing required field 'action'",
    ),
    (
        "      - action: permit\n        protocol: icmp",
        "      - action: allow\n        protocol: icmp",
        "f.yaml:26: profiles[2].rules[1].action: profile 'db' rule 2: expected 'permit' or"
        " 'deny', got 'allow'",
    ),
    (
        "icmp_type: echo",
        "icmp_type: echoo",
        "f.yaml:28: profiles[2].rules[1].icmp_type: profile 'db' rule 2: unknown ICMP type 'echoo'",
    ),
    (
        "protocol: icmp",
        "protocol: tcp",
        "f.yaml:28: profiles[2].rules[1].icmp_type: profile 'db' rule 2: an ICMP type needs"
        " protocol icmp or icmpv6",
    ),
    (
        "icmp_type: echo",
        "icmp_code: 0",
        "f.yaml:28: profiles[2].rules[1].icmp_code: profile 'db' rule 2: icmp_code needs icmp_type",
    ),
    (
        "icmp_type: echo",
        "icmp_type: port-unreachable\n        icmp_code: 1",
        "f.yaml:29: profiles[2].rules[1].icmp_code: profile 'db' rule 2: icmp_type already"
        " sets code 3",
    ),
    (
        "icmp_type: echo",
        "icmp_type: echo\n        icmp_code: 256",
        "f.yaml:29: profiles[2].rules[1].icmp_code: profile 'db' rule 2: 256 out of range 0..255",
    ),
    (
        "      - permit tcp any profile:web eq 443",
        "      - 42",
        "f.yaml:7: profiles[0].rules[0]: profile 'web' rule 1: expected a rule (a string or a"
        " mapping), got 42",
    ),
    (
        "      - permit tcp any profile:web eq 443\n      - permit tcp profile:web",
        "      - 20 permit tcp any profile:web eq 443\n      - 10 permit tcp profile:web",
        "f.yaml:8: profiles[0].rules[1]: profile 'web' rule 2: sequence 10 is not above 20",
    ),
    (
        "vms: [web-*]",
        "vms: [db-01]",
        "f.yaml:19: profiles[2].vms[0]: profile 'db': VM 'db-01' is already bound to profile 'web'",
    ),
    (
        "vms: [web-*]",
        "vms: web-*",
        "f.yaml:5: profiles[0].vms: profile 'web': expected a list, got str",
    ),
    (
        "    description: Public web front ends",
        "    descriptio: Public web front ends",
        "f.yaml:3: profiles[0].descriptio: profile 'web': unknown field; expected one of"
        " default, description, name, rules, vms",
    ),
    ("profiles:", "profile:", "f.yaml:2: profile: unknown field; expected one of profiles"),
    (GOOD, "", "f.yaml:1: the file is empty"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD, ids=[b[1][:40] for b in BAD])
def test_errors_name_file_line_field_profile_and_rule(old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(PolicyError) as info:
        loads_policy(GOOD.replace(old, new, 1), "f.yaml")
    assert str(info.value) == message


def test_yaml_syntax_errors_are_policy_errors_with_the_line() -> None:
    with pytest.raises(PolicyError, match=r"^f\.yaml:6: YAML syntax: "):
        loads_policy(GOOD.replace("vms: [web-*]", "vms: [web-*"), "f.yaml")


INVENTORY = f"""\
hosts:
  - name: hv01
    collector_id: 1
vms:
  - name: web-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000001
    host: hv01
    profile: web
    nics: [{{mac: "52:54:00:00:00:01", vif: 1}}]
  - name: web-02
    uuid: 6f1c2d9e-0000-4000-8000-000000000002
    host: hv01
    nics: [{{mac: "52:54:00:00:00:02", vif: 2}}]
  - name: db-07
    uuid: {DB_UUID}
    host: hv01
    profile: app
    nics: [{{mac: "52:54:00:00:00:03", vif: 3}}]
  - name: app-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000004
    host: hv01
    profile: legacy
    nics: [{{mac: "52:54:00:00:00:04", vif: 4}}]
"""


def test_bindings_precedence_listed_then_inventory_then_pattern() -> None:
    policy = loads_policy(GOOD.replace("vms: [web-*]", "vms: [web-*, app-*]"), "f.yaml")
    bindings = bind(policy, Inventory.loads(INVENTORY))
    # web-01: the inventory; web-02: no inventory profile, so web's pattern.
    assert bindings.profile_of("web-01") == "web"
    assert bindings.profile_of("web-02") == "web"
    # db-07 is listed by UUID in db's vms, which beats its inventory profile 'app'.
    assert bindings.profile_of("db-07") == "db"
    # app-01's inventory profile is undefined; the pattern app-* of web applies.
    assert bindings.profile_of("app-01") == "web"
    # VMs the inventory does not know bind by name through the patterns, or not at all.
    assert bindings.profile_of("web-99") == "web"
    assert bindings.profile_of("db-01") == "db"
    assert bindings.profile_of("cache-01") is None
    assert bindings.key_of("db-07") == DB_UUID
    assert bindings.key_of("web-99") == "web-99"
    assert bindings.warnings == (
        "VM 'app-01' has profile 'legacy' in the inventory, which f.yaml does not define; its"
        " flows are evaluated at the other end only",
        "f.yaml:19: profiles[2].vms[0]: profile 'db': 'db-01' matches no VM",
        "VM 'db-07' is bound to profile 'db' by f.yaml and to 'app' by the inventory; 'db' applies",
    )


def test_vm_references_that_match_nothing_are_warnings() -> None:
    text = GOOD.replace("permit tcp any profile:web eq 443", "permit tcp vm:web-0? vm:nope eq 443")
    bindings = bind(loads_policy(text, "f.yaml"), Inventory.loads(INVENTORY))
    assert "f.yaml:7: profiles[0].rules[0]: vm:nope matches no VM" in bindings.warnings
    assert not any("web-0?" in w for w in bindings.warnings)


def test_without_an_inventory_nothing_is_warned() -> None:
    assert bind(loads_policy(GOOD, "f.yaml")).warnings == ()


def test_the_example_file_binds_every_simulated_vm_to_its_tier() -> None:
    policy = load_policy(str(EXAMPLE))
    capture = generate_small()
    bindings = bind(policy, capture.inventory())
    assert bindings.warnings == ()
    assert {vm.name: bindings.profile_of(vm.name) for vm in capture.vms} == {
        vm.name: vm.profile for vm in capture.vms
    }


def test_empty_rules_and_vms_are_none() -> None:
    policy = loads_policy(
        "profiles:\n  - name: a\n    rules:\n    vms:\n  - name: b\n    rules: []\n"
    )
    assert [(p.rules, p.vms) for p in policy.profiles] == [((), ()), ((), ())]


# --- any document loads or raises PolicyError -----------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from(["permit", "deny", "tcp", "icmp", "echo", "any", "web", "db", "profile:db",
                     "vm:web-*", "10.0.0.0/8", "eq 443", "range 2 1", "permit tcp any any eq 80",
                     "deny ip any profile:web", "web-*", ""]),
    st.text(max_size=8),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
rule_maps = st.dictionaries(
    st.sampled_from(["action", "protocol", "source", "destination", "ports", "source_ports",
                     "icmp_type", "icmp_code", "name", "remark", "bogus"]),
    values,
    max_size=5,
)  # fmt: skip
profile_maps = st.fixed_dictionaries(
    {"name": st.sampled_from(["web", "db", "web", "x y", 3])},
    optional={
        "default": values,
        "description": values,
        "vms": values,
        "rules": st.lists(st.one_of(scalars, rule_maps), max_size=4) | values,
    },
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.fixed_dictionaries({"profiles": st.lists(profile_maps, max_size=3)}), values))
def test_any_document_loads_or_raises_policy_error(document: object) -> None:
    try:
        loads_policy(yaml.safe_dump(document), "fuzz.yaml")
    except PolicyError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("fuzz.yaml:")  # every error says where
