"""Evaluating port-profiles on flow records: the convention on hand-built flows, hit counters
that follow a migrating VM, and a row-by-row reference evaluator that the vectorized one must
agree with on the simulator's traffic, for the example profiles and for random policies."""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vspan.analysis.policy.acl import (
    ANY,
    Action,
    Address,
    AnyAddress,
    PortMatch,
    PortOp,
    Prefix,
    ProfileRef,
    Rule,
    VmRef,
    check_rule,
    format_rule,
)
from vspan.analysis.policy.evaluate import PolicyCounters, compile_policy, evaluate, never_hit
from vspan.analysis.policy.profiles import PolicySet, load_policy, loads_policy
from vspan.analysis.report import analyze_captures
from vspan.errors import PolicyError
from vspan.inventory import Host, Inventory, Nic, Vm
from vspan.synth import SynthCapture, generate_small, write_capture, write_inventory_yaml

EXAMPLE = Path(__file__).parents[3] / "docs" / "examples" / "profiles.yaml"

# --- hand-built flows -----------------------------------------------------------------------

VMS = {  # name: (ipv4, ipv6, profile, host)
    "web-01": ("10.1.0.1", "fd00::1:0:1", "web", "hv01"),
    "web-02": ("10.1.0.2", "fd00::1:0:2", "web", "hv02"),
    "app-01": ("10.2.0.1", "fd00::2:0:1", "app", "hv01"),
    "db-01": ("10.3.0.1", "fd00::3:0:1", "db", "hv02"),
    "ops-01": ("10.9.0.1", "fd00::9:0:1", None, "hv01"),
}
UUID = {name: f"6f1c2d9e-0000-4000-8000-{i:012d}" for i, name in enumerate(VMS, 1)}
INVENTORY = Inventory(
    [Host("hv01", 1), Host("hv02", 2)],
    [
        Vm(name, UUID[name], host, (Nic(0x525400000000 + i, i, (v4, v6)),), profile)
        for i, (name, (v4, v6, profile, host)) in enumerate(VMS.items(), 1)
    ],
)


def flow(
    src: str, dst: str, proto: int | None = 6, dport: int | None = None, **more: Any
) -> dict[str, Any]:
    """A flow record between VMs (by name) or addresses; ``v6=True`` uses the VMs' IPv6."""
    v6 = more.pop("v6", False)

    def end(x: str) -> tuple[str | None, str | None, str | None]:
        if x in VMS:
            return x, VMS[x][1 if v6 else 0], VMS[x][3]
        return None, x, None

    (svm, sip, shost), (dvm, dip, dhost) = end(src), end(dst)
    row = {
        "src_vm": svm, "dst_vm": dvm, "src_host": shost, "dst_host": dhost, "proto": proto,
        "src_ip": sip, "dst_ip": dip, "src_port": 40000 if proto in (6, 17) else None,
        "dst_port": dport, "icmp_type": None, "icmp_code": None, "icmp_id": None,
        "packets": 3, "bytes": 300, "packets_rev": 2, "bytes_rev": 200, "first_ns": 1,
        "last_ns": 10,
    }  # fmt: skip
    row.update(more)
    return row


def records(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(flow("a", "b")))
    frame.insert(0, "flow_id", range(1, len(frame) + 1))
    for col in ("proto", "src_port", "dst_port", "icmp_type", "icmp_code", "icmp_id"):
        frame[col] = frame[col].astype("Int64")
    return frame


def missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def plain(values: Iterable[object]) -> list[object]:
    return [None if missing(v) else v for v in values]


def policy(text: str) -> PolicySet:
    return loads_policy("profiles:\n" + text, "p.yaml")


TIERS = """\
  - name: web
    default: permit
  - name: app
    default: permit
"""


def verdicts(text: str, rows: Iterable[dict[str, Any]]) -> list[tuple[object, ...]]:
    result = evaluate(records(rows), compile_policy(policy(text), INVENTORY)).flows
    cols = ["policy_verdict", "policy_rule", "policy_side"]
    return list(zip(*(plain(result[c]) for c in cols), strict=True))


def test_first_matching_rule_wins_else_the_default() -> None:
    db = """\
  - name: db
    default: deny
    rules:
      - permit tcp 10.2.0.0/16 any eq 5432
      - deny tcp any any eq 5432
      - permit tcp any any
"""
    rows = [
        flow("app-01", "db-01", dport=5432),
        flow("web-01", "db-01", dport=5432),
        flow("web-01", "db-01", dport=22),
        flow("web-01", "db-01", proto=17, dport=53),
    ]
    assert verdicts(TIERS + db, rows) == [
        ("permit", "app#default", "egress"),
        ("deny", "db#2", "ingress"),
        ("permit", "web#default", "egress"),
        ("deny", "db#default", "ingress"),
    ]


def test_both_ends_are_checked_and_either_can_deny() -> None:
    text = """\
  - name: web
    default: permit
    rules:
      - deny tcp profile:web any eq 25
  - name: app
    default: deny
    rules:
      - permit tcp any profile:app eq 8080
  - name: db
    default: deny
"""
    rows = [
        flow("web-01", "app-01", dport=8080),  # both permit
        flow("web-01", "app-01", dport=25),  # both deny: the egress side is reported
        flow("web-01", "app-01", dport=9000),  # web permits, app's ingress denies
        flow("app-01", "web-01", dport=80),  # app's egress denies (written for ingress only)
        flow("ops-01", "web-01", dport=80),  # ops-01 has no profile: web's side only
        flow("ops-01", "198.51.100.7", dport=80),  # no side has a profile
        flow("198.51.100.7", "db-01", dport=5432),  # an external peer: db's side only
        flow("web-01", "db-01", proto=None, src_ip=None, dst_ip=None),  # not IP
    ]
    assert verdicts(text, rows) == [
        ("permit", "web#default", "egress"),
        ("deny", "web#1", "egress"),
        ("deny", "app#default", "ingress"),
        ("deny", "app#default", "egress"),
        ("permit", "web#default", "ingress"),
        ("none", None, None),
        ("deny", "db#default", "ingress"),
        ("none", None, None),
    ]
    both = evaluate(records(rows[:2]), compile_policy(policy(text), INVENTORY)).flows
    assert plain(both["egress_rule"]) == ["web#default", "web#1"]
    assert plain(both["ingress_rule"]) == ["app#1", "app#default"]


def test_a_rule_is_absolute_so_the_same_text_works_in_both_profiles() -> None:
    # "app may call db on 5432", written once, copied to both ends; db-01 calling app-01 on
    # 5432 is the other direction and matches neither.
    rule = "permit tcp profile:app profile:db eq 5432"
    text = f"  - name: app\n    rules: ['{rule}']\n  - name: db\n    rules: ['{rule}']\n"
    rows = [flow("app-01", "db-01", dport=5432), flow("db-01", "app-01", dport=5432)]
    assert verdicts(text, rows) == [
        ("permit", "app#1", "egress"),
        ("deny", "db#default", "egress"),
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("permit ip 10.1.0.0/16 any", [True, False, True, True, False]),
        ("permit ip host 10.1.0.1 any", [True, False, True, True, False]),
        ("permit ip 10.1.0.2/31 any", [False, False, False, False, False]),
        ("permit ip fd00::/16 any", [False, True, False, False, False]),
        ("permit ip fd00::1:0:0/112 any", [False, True, False, False, False]),
        ("permit ip host fd00::1:0:1 any", [False, True, False, False, False]),
        ("permit ip any 198.51.100.0/24", [False, False, True, False, False]),
        ("permit ip 0.0.0.0/0 any", [True, False, True, True, False]),
        ("permit ip ::/0 any", [False, True, False, False, False]),
    ],
)
def test_prefixes_of_both_families(rule: str, expected: list[bool]) -> None:
    text = f"  - name: web\n    default: deny\n    rules: ['{rule}']\n"
    rows = [
        flow("web-01", "ops-01"),
        flow("web-01", "ops-01", v6=True),
        flow("web-01", "198.51.100.7"),
        flow("web-01", "ops-01", src_ip="::ffff:10.1.0.1"),  # IPv4-mapped is IPv4
        flow("web-01", "ops-01", src_ip="not-an-address"),
    ]
    assert [v == "permit" for v, _, _ in verdicts(text, rows)] == expected


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ("range 1000 2000", [False, True, True, True, False, False]),
        ("eq 1000", [False, True, False, False, False, False]),
        ("neq 1000", [True, False, True, True, True, False]),
        ("lt 1000", [True, False, False, False, False, False]),
        ("gt 2000", [False, False, False, False, True, False]),
        ("lt 1000 gt 2000", [True, False, False, False, True, False]),
    ],
)
def test_port_operators_at_their_bounds(ports: str, expected: list[bool]) -> None:
    text = f"  - name: db\n    default: deny\n    rules: ['permit udp any any {ports}']\n"
    rows = [flow("ops-01", "db-01", 17, p) for p in (999, 1000, 1001, 2000, 2001)]
    rows.append(flow("ops-01", "db-01", 1, None))  # no ports at all
    assert [v == "permit" for v, _, _ in verdicts(text, rows)] == expected


def test_source_ports_test_the_initiators_port() -> None:
    text = "  - name: db\n    default: deny\n    rules: ['permit udp any eq 53 any']\n"
    rows = [flow("ops-01", "db-01", 17, 9999, src_port=53), flow("ops-01", "db-01", 17, 53)]
    assert [v for v, _, _ in verdicts(text, rows)] == ["permit", "deny"]


def test_icmp_types_codes_and_echo_flows() -> None:
    text = """\
  - name: db
    default: deny
    rules:
      - permit icmp any any echo
      - permit icmpv6 any any echo
      - permit icmp any any ttl-exceeded
      - permit icmp any any 3 4
"""
    rows = [
        flow("ops-01", "db-01", 1, icmp_id=7),  # an echo flow: request, then replies
        flow("ops-01", "db-01", 58, icmp_id=7, v6=True),
        flow("ops-01", "db-01", 58, icmp_type=129, icmp_code=0, v6=True),  # a lone reply
        flow("ops-01", "db-01", 1, icmp_type=11, icmp_code=0),
        flow("ops-01", "db-01", 1, icmp_type=11, icmp_code=1),
        flow("ops-01", "db-01", 1, icmp_type=3, icmp_code=4),
        flow("ops-01", "db-01", 1, icmp_type=3, icmp_code=3),
    ]
    assert [r for _, r, _ in verdicts(text, rows)] == [
        "db#1", "db#2", "db#default", "db#3", "db#default", "db#4", "db#default"
    ]  # fmt: skip


def test_vm_and_profile_references() -> None:
    text = f"""\
  - name: db
    default: deny
    rules:
      - permit tcp vm:web-0? any eq 5432
      - permit tcp vm:{UUID["ops-01"]} any eq 5432
      - permit tcp profile:app profile:db eq 5432
  - name: app
    default: permit
"""
    rows = [flow(s, "db-01", dport=5432) for s in ("web-02", "ops-01", "app-01", "10.1.0.1")]
    result = evaluate(records(rows), compile_policy(policy(text), INVENTORY)).flows
    assert plain(result["ingress_rule"]) == ["db#1", "db#2", "db#3", "db#default"]


def test_evaluation_never_raises_on_odd_records() -> None:
    compiled = compile_policy(load_policy(str(EXAMPLE)), INVENTORY)
    odd = pd.DataFrame(
        {
            "src_vm": ["web-01", None, "nobody", 7.5],
            "dst_vm": ["db-01", "db-01", None, None],
            "proto": ["6", "x", None, 1e300],
            "src_ip": ["10.1.0.1", "300.1.1.1", 5, None],
            "dst_port": [5432, -4, 1e30, float("nan")],
        }
    )
    result = evaluate(odd, compiled)
    assert plain(result.flows["policy_verdict"]) == ["deny", "none", "none", "none"]
    assert evaluate(odd.iloc[:0], compiled).hits.empty
    assert evaluate(pd.DataFrame({"src_vm": ["web-01"]}), compiled).violations.empty


# --- hits, violations, counters -------------------------------------------------------------

HITS_POLICY = """\
  - name: web
    default: permit
    rules:
      - deny tcp any any eq 25
  - name: db
    default: deny
    rules:
      - permit tcp profile:app any eq 5432
      - permit tcp profile:web any eq 5432
  - name: app
    default: permit
"""


def test_hits_count_flows_packets_and_bytes_per_rule_and_vm() -> None:
    rows = [
        flow("app-01", "db-01", dport=5432, last_ns=50),
        flow("app-01", "db-01", dport=5432, last_ns=70, packets=10, bytes=1000),
        flow("web-01", "web-02", dport=25, last_ns=30),  # both ends in web: a hit for each
        flow("ops-01", "db-01", dport=22, last_ns=40),
    ]
    compiled = compile_policy(policy(HITS_POLICY), INVENTORY)
    result = evaluate(records(rows), compiled)
    hits = result.hits
    assert list(hits.columns) == [
        "profile", "index", "rule", "action", "vm", "vm_name", "host", "flows", "packets",
        "bytes", "last_ns",
    ]  # fmt: skip
    got = {
        (r.rule, r.vm_name): (r.vm, r.host, r.flows, r.packets, r.bytes, r.last_ns)
        for r in hits.itertuples()
    }
    assert got == {
        ("web#1", "web-01"): (UUID["web-01"], "hv01", 1, 5, 500, 30),
        ("web#1", "web-02"): (UUID["web-02"], "hv02", 1, 5, 500, 30),
        ("db#1", "db-01"): (UUID["db-01"], "hv02", 2, 17, 1700, 70),
        ("db#default", "db-01"): (UUID["db-01"], "hv02", 1, 5, 500, 40),
        ("app#default", "app-01"): (UUID["app-01"], "hv01", 2, 17, 1700, 70),
    }
    assert hits["rule"].tolist()[:3] == ["web#1", "web#1", "db#1"]  # in catalog order
    assert list(result.violations["flow_id"]) == [3, 4]
    assert plain(result.violations["policy_rule"]) == ["web#1", "db#default"]
    assert plain(result.violations["src_host"]) == ["hv01", "hv01"]
    unused = never_hit(compiled, hits)
    assert list(unused["rule"]) == ["db#2"]
    assert list(unused["text"]) == ["permit tcp profile:web any eq 5432"]


def test_counters_continue_when_a_vm_migrates() -> None:
    compiled = compile_policy(policy(HITS_POLICY), INVENTORY)
    counters = PolicyCounters()
    assert counters.snapshot().empty
    before = [flow("app-01", "db-01", dport=5432, last_ns=100)]  # db-01 on hv02
    after = [
        flow("app-01", "db-01", dport=5432, last_ns=300, dst_host="hv01"),  # db-01 moved
        flow("app-01", "db-01", dport=5432, last_ns=200, dst_host="hv01"),
    ]
    counters.add(evaluate(records(before), compiled).hits)
    first = counters.snapshot()
    counters.add(evaluate(records(after), compiled).hits)
    counters.add(evaluate(records([]), compiled).hits)
    snap = counters.snapshot()
    assert list(snap.columns) == list(first.columns)
    row = snap[snap["rule"] == "db#1"].to_dict("records")[0]
    assert (row["vm"], row["vm_name"], row["host"]) == (UUID["db-01"], "db-01", "hv01")
    assert (row["flows"], row["packets"], row["bytes"], row["last_ns"]) == (3, 15, 1500, 300)
    assert snap["rule"].tolist() == ["app#default", "db#1"]
    assert first[first["rule"] == "db#1"]["host"].tolist() == ["hv02"]
    assert never_hit(compiled, snap)["rule"].tolist() == ["web#1", "db#2"]


# --- the reference evaluator ----------------------------------------------------------------


class Reference:
    """A straightforward per-flow evaluator written from docs/policy.md, row by row."""

    def __init__(self, pol: PolicySet, inventory: Inventory) -> None:
        self.policy = pol
        self.uuid = {vm.name: vm.uuid for vm in inventory.vms}
        self.inventory = {vm.name: vm.profile for vm in inventory.vms}
        self.names = {p.name for p in pol.profiles}

    def names_vm(self, pattern: str, vm: str | None) -> bool:
        uuid = self.uuid.get(vm or "")
        return vm is not None and (
            fnmatchcase(vm, pattern) or (uuid is not None and fnmatchcase(uuid, pattern))
        )

    def profile(self, vm: str | None) -> str | None:
        if vm is None:
            return None
        for p in self.policy.profiles:
            if vm in p.vms or self.uuid.get(vm) in p.vms:
                return p.name
        if self.inventory.get(vm) in self.names:
            return self.inventory[vm]
        for p in self.policy.profiles:
            if any(set("*?[") & set(e) and self.names_vm(e, vm) for e in p.vms):
                return p.name
        return None

    def address(self, addr: Address, ip: str | None, vm: str | None) -> bool:
        if isinstance(addr, AnyAddress):
            return True
        if isinstance(addr, Prefix):
            try:
                a = ipaddress.ip_address(ip or "")
            except ValueError:
                return False
            if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
                a = a.ipv4_mapped
            return a in addr.network
        if isinstance(addr, VmRef):
            return self.names_vm(addr.pattern, vm)
        assert isinstance(addr, ProfileRef)
        return vm is not None and self.profile(vm) == addr.name

    @staticmethod
    def port(m: PortMatch, port: int | None) -> bool:
        if port is None:
            return False
        if m.op is PortOp.RANGE:
            return m.port <= port <= (m.high or 0)
        return {
            "eq": port == m.port,
            "neq": port != m.port,
            "lt": port < m.port,
            "gt": port > m.port,
        }[m.op]

    def matches(self, rule: Rule, f: dict[str, Any]) -> bool:
        if f["proto"] is None or (rule.protocol is not None and rule.protocol != f["proto"]):
            return False
        if not self.address(rule.source, f["src_ip"], f["src_vm"]):
            return False
        if not self.address(rule.destination, f["dst_ip"], f["dst_vm"]):
            return False
        if rule.source_ports and not any(self.port(m, f["src_port"]) for m in rule.source_ports):
            return False
        if rule.ports and not any(self.port(m, f["dst_port"]) for m in rule.ports):
            return False
        icmp_type, icmp_code = f["icmp_type"], f["icmp_code"]
        if icmp_type is None and f["icmp_id"] is not None and f["proto"] in (1, 58):
            icmp_type, icmp_code = (8 if f["proto"] == 1 else 128), 0
        if rule.icmp_type is not None and rule.icmp_type != icmp_type:
            return False
        return rule.icmp_code is None or rule.icmp_code == icmp_code

    def side(self, vm: str | None, f: dict[str, Any]) -> tuple[str, int, Action] | None:
        name = self.profile(vm)
        if name is None or f["proto"] is None:
            return None
        p = next(p for p in self.policy.profiles if p.name == name)
        for i, rule in enumerate(p.rules, 1):
            if self.matches(rule, f):
                return name, i, rule.action
        return name, 0, p.default

    def run(
        self, frame: pd.DataFrame
    ) -> tuple[list[tuple[object, ...]], Counter[tuple[object, ...]]]:
        out: list[tuple[object, ...]] = []
        hits = Counter[tuple[object, ...]]()
        for raw in frame.to_dict("records"):
            f: dict[str, Any] = {str(k): None if missing(v) else v for k, v in raw.items()}
            egress, ingress = self.side(f["src_vm"], f), self.side(f["dst_vm"], f)
            label = [
                None if s is None else f"{s[0]}#{s[1] or 'default'}" for s in (egress, ingress)
            ]
            sides = [(i, s) for i, s in enumerate((egress, ingress)) if s is not None]
            denied = [i for i, s in sides if s[2] is Action.DENY]
            chosen = denied[0] if denied else (sides[0][0] if sides else None)
            verdict = "deny" if denied else ("permit" if sides else "none")
            side_name = None if chosen is None else ("egress", "ingress")[chosen]
            out.append((verdict, None if chosen is None else label[chosen], side_name, *label))
            for s, vm in ((egress, f["src_vm"]), (ingress, f["dst_vm"])):
                if s is not None:
                    key = (s[0], s[1], self.uuid.get(vm, vm))
                    hits[(*key, "flows")] += 1
                    hits[(*key, "packets")] += f["packets"] + f["packets_rev"]
                    hits[(*key, "bytes")] += f["bytes"] + f["bytes_rev"]
                    hits[(*key, "last_ns")] = max(hits[(*key, "last_ns")], f["last_ns"])
        return out, hits


def vectorized(
    frame: pd.DataFrame, pol: PolicySet, inventory: Inventory
) -> tuple[list[tuple[object, ...]], Counter[tuple[object, ...]], pd.DataFrame]:
    result = evaluate(frame, compile_policy(pol, inventory))
    cols = ["policy_verdict", "policy_rule", "policy_side", "egress_rule", "ingress_rule"]
    rows = list(zip(*(plain(result.flows[c]) for c in cols), strict=True))
    hits = Counter[tuple[object, ...]]()
    for h in result.hits.itertuples():
        for what in ("flows", "packets", "bytes", "last_ns"):
            hits[(h.profile, h.index, h.vm, what)] = getattr(h, what)
    return rows, hits, result.violations


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCapture, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("policy")
    capture = generate_small(seed=5)
    write_capture(capture, folder / "dc.pcapng")
    write_inventory_yaml(capture, folder / "dc.yaml")
    inventory = Inventory.load(str(folder / "dc.yaml"))
    return capture, analyze_captures([folder / "dc.pcapng"], inventory=inventory).flows


def test_the_example_profiles_on_simulated_traffic(dc: tuple[SynthCapture, pd.DataFrame]) -> None:
    capture, frame = dc
    pol, inventory = load_policy(str(EXAMPLE)), capture.inventory()
    expected, expected_hits = Reference(pol, inventory).run(frame)
    rows, hits, violations = vectorized(frame, pol, inventory)
    assert rows == expected
    assert hits == expected_hits
    denied = [i for i, r in enumerate(expected) if r[0] == "deny"]
    assert violations["flow_id"].tolist() == frame["flow_id"].iloc[denied].tolist()
    # The numbers the reference derives: a realistic policy meets traffic that breaks it.
    verdicts = Counter(r[0] for r in expected)
    assert verdicts["permit"] > 10
    assert verdicts["deny"] > 5
    assert verdicts["none"] == 0  # every simulated VM has a profile
    assert sum(v for k, v in expected_hits.items() if k[3] == "flows") == sum(
        (r[3] is not None) + (r[4] is not None) for r in expected
    )


def test_the_example_profiles_decide_the_expected_tiers(
    dc: tuple[SynthCapture, pd.DataFrame],
) -> None:
    capture, frame = dc
    result = evaluate(frame, compile_policy(load_policy(str(EXAMPLE)), capture.inventory()))
    flows = result.flows.assign(tier=lambda d: d["dst_vm"].str.split("-").str[0])
    to_db = flows[(flows["tier"] == "db") & (flows["dst_port"] == 5432)]
    from_app = to_db["src_vm"].str.startswith("app-").fillna(False).astype(bool)
    assert set(to_db.loc[from_app, "policy_verdict"]) <= {"permit"}
    assert set(to_db.loc[~from_app, "policy_verdict"]) <= {"deny"}


# --- random policies -------------------------------------------------------------------------

SYNTH = generate_small(seed=5)
SYNTH_VMS = [vm.name for vm in SYNTH.vms]
PROFILES = ["web", "app", "db", "cache", "backup", "extra"]
PORTS = [22, 53, 80, 123, 161, 443, 514, 873, 3306, 4739, 5001, 5432, 6379, 8080, 8443, 11211]
PREFIXES_V4 = ["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/24", "10.4.0.1/32",
               "198.18.0.0/15", "198.51.100.0/24", "0.0.0.0/0"]  # fmt: skip
PREFIXES_V6 = ["fd00::/8", "fd00::1:0:0/112", "fd00::3:0:2/128", "2001:db8::/32", "::/0"]


def addresses(family: list[str]) -> st.SearchStrategy[Address]:
    return st.one_of(
        st.just(ANY),
        st.sampled_from(family).map(lambda t: Prefix(ipaddress.ip_network(t))),
        st.sampled_from([*SYNTH_VMS, "web-*", "*-01", "db-0?", SYNTH.vms[0].uuid]).map(VmRef),
        st.sampled_from(PROFILES).map(ProfileRef),
    )


port_matches = st.one_of(
    st.builds(PortMatch, st.sampled_from([PortOp.EQ, PortOp.NEQ]), st.sampled_from(PORTS)),
    st.builds(
        PortMatch, st.sampled_from([PortOp.LT, PortOp.GT]), st.sampled_from([1024, 5000, 32768])
    ),
    st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(
        lambda p: PortMatch(PortOp.RANGE, min(p), max(p))
    ),
)


@st.composite
def random_rules(draw: st.DrawFn) -> Rule:
    protocol = draw(st.sampled_from([None, 6, 6, 17, 1, 58]))
    family = {1: PREFIXES_V4, 58: PREFIXES_V6}.get(protocol or 0) or draw(
        st.sampled_from([PREFIXES_V4, PREFIXES_V6])
    )
    ported = protocol in (6, 17)
    icmp = protocol in (1, 58) and draw(st.booleans())
    rule = Rule(
        action=draw(st.sampled_from(Action)),
        protocol=protocol,
        source=draw(addresses(family)),
        destination=draw(addresses(family)),
        source_ports=tuple(draw(st.lists(port_matches, max_size=1))) if ported else (),
        ports=tuple(draw(st.lists(port_matches, max_size=2))) if ported else (),
        icmp_type=draw(st.sampled_from([0, 3, 8, 11, 128, 129])) if icmp else None,
        icmp_code=draw(st.sampled_from([None, 0])) if icmp else None,
    )
    try:
        return check_rule(rule)
    except PolicyError:
        return Rule(rule.action, rule.protocol)


@st.composite
def random_policies(draw: st.DrawFn) -> tuple[str, list[str]]:
    lines = ["profiles:"]
    for name in PROFILES:
        lines += [f"  - name: {name}", f"    default: {draw(st.sampled_from(Action)).value}"]
        if name == "extra":
            listed = st.sampled_from([*SYNTH_VMS, "web-*", "cache-*", SYNTH.vms[3].uuid])
            lines.append(f"    vms: {draw(st.lists(listed, max_size=3, unique=True))}")
        lines.append("    rules:")
        lines += [f"      - {format_rule(r)}" for r in draw(st.lists(random_rules(), max_size=6))]
        if lines[-1] == "    rules:":
            lines[-1] = "    rules: []"
    unbound = draw(st.lists(st.sampled_from(SYNTH_VMS), max_size=4, unique=True))
    return "\n".join(lines) + "\n", unbound


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(random_policies())
def test_vectorized_agrees_with_the_reference_on_random_policies(
    dc: tuple[SynthCapture, pd.DataFrame], drawn: tuple[str, list[str]]
) -> None:
    capture, frame = dc
    text, unbound = drawn
    base = capture.inventory()
    # Some VMs lose their inventory profile, so that patterns and listings bind them.
    inventory = Inventory(
        list(base.hosts),
        [
            Vm(v.name, v.uuid, v.host, v.nics, None if v.name in unbound else v.profile)
            for v in base.vms
        ],
    )
    pol = loads_policy(text, "random.yaml")
    expected, expected_hits = Reference(pol, inventory).run(frame)
    rows, hits, violations = vectorized(frame, pol, inventory)
    assert rows == expected
    assert hits == expected_hits
    assert len(violations) == sum(r[0] == "deny" for r in expected)


def test_the_records_index_is_kept() -> None:
    frame = records([flow("web-01", "db-01", dport=5432)] * 2).set_axis([7, 3])
    result = evaluate(frame, compile_policy(policy(HITS_POLICY), INVENTORY))
    assert result.flows.index.tolist() == [7, 3]
    assert result.flows["ingress_rule"].tolist() == ["db#2", "db#2"]
