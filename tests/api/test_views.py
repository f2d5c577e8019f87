"""The view routers over real HTTP (uvicorn on 127.0.0.1): hosts, VMs, top, matrix, SPAN
sessions and pcap downloads, with expectations computed from the simulator's ground truth
by plain Python (not by the code under test)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vspan.analysis.inventory.span_sessions import SessionStore
from vspan.analysis.views import EXTERNAL
from vspan.collectors.control.client import ControlClient
from vspan.inventory import Host, Port
from vspan.sessions import SessionSet
from vspan_testing.served import Served, serve_views
from vspan_testing.tshark import needs_tshark


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_views(tmp_path_factory.mktemp("views")) as served:
        yield served


def _truth(served: Served) -> list[dict[str, Any]]:
    rows = [{str(k): v for k, v in r.items()} for r in served.data.cap.truth.to_dict("records")]
    for r in rows:
        r["total"] = int(r["bytes"]) + int(r["bytes_rev"])
        r["pkts"] = int(r["packets"]) + int(r["packets_rev"])
        for key in ("src_vm", "dst_vm", "src_host", "dst_host"):
            r[key] = EXTERNAL if r[key] is None or pd.isna(r[key]) else r[key]
    return rows


def test_hosts_count_vms_and_split_intra_from_cross_host_bytes(served: Served) -> None:
    truth, cap = _truth(served), served.data.cap
    want: dict[str, Counter[str]] = defaultdict(Counter)
    for r in truth:
        for host in {r["src_host"], r["dst_host"]} - {EXTERNAL}:
            want[host]["bytes"] += r["total"]
            want[host]["flows"] += 1
            if r["scope"] == "intra-host":
                want[host]["intra_bytes"] += r["total"]
            if r["scope"] == "cross-host":
                want[host]["cross_bytes"] += r["total"]
    hosts = served.get("/api/v1/hosts")["hosts"]
    assert [h["name"] for h in hosts] == sorted(h.name for h in cap.inventory().hosts)
    for h in hosts:
        assert h["vms"] == sum(vm.host == h["name"] for vm in cap.inventory().vms)
        got = {k: h[k] for k in ("bytes", "flows", "intra_bytes", "cross_bytes")}
        assert got == {k: want[h["name"]][k] for k in got}, h["name"]
    assert sum(h["intra_bytes"] for h in hosts) == sum(
        r["total"] for r in truth if r["scope"] == "intra-host"
    )


def test_vms_list_every_vm_with_its_traffic(served: Served) -> None:
    truth = _truth(served)
    vms = served.get("/api/v1/vms")["vms"]
    inventory = served.data.cap.inventory()
    assert [v["name"] for v in vms] == sorted(v.name for v in inventory.vms)
    for v in vms:
        mine = [r for r in truth if v["name"] in (r["src_vm"], r["dst_vm"])]
        assert (v["flows"], v["bytes"]) == (len(mine), sum(r["total"] for r in mine)), v["name"]
        vm = inventory.vm(v["name"])
        assert vm is not None
        assert [n["vif"] for n in v["vifs"]] == [n.vif for n in vm.nics]


def test_vm_detail_by_name_and_by_uuid(served: Served) -> None:
    truth = _truth(served)
    vm = served.data.cap.inventory().vm("web-01")
    assert vm is not None
    by_name = served.get("/api/v1/vms/web-01")
    assert served.get(f"/api/v1/vms/{vm.uuid.upper()}") == by_name
    assert (by_name["uuid"], by_name["host"], by_name["profile"]) == (vm.uuid, vm.host, vm.profile)
    assert by_name["host_history"][0]["host"] == vm.host
    mine = [r for r in truth if "web-01" in (r["src_vm"], r["dst_vm"])]
    sent = sum(r["bytes"] if r["src_vm"] == "web-01" else r["bytes_rev"] for r in mine)
    traffic = by_name["traffic"]
    assert traffic["flows"] == len(mine)
    assert traffic["bytes_sent"] == sent
    assert traffic["bytes_received"] == sum(r["total"] for r in mine) - sent
    assert traffic["intra_bytes"] + traffic["cross_bytes"] <= traffic["bytes"]
    assert len(by_name["flows"]) == min(20, len(mine))
    stored = served.data.migrations
    assert [m["to_host"] for m in by_name["migrations"]] == list(
        stored.loc[stored["vm_name"] == "web-01", "to_host"]
    )
    hits = served.data.hits
    assert sum(h["flows"] for h in by_name["policy_hits"]) == int(
        hits.loc[hits["vm_name"] == "web-01", "flows"].sum()
    )


def test_unknown_vm_is_a_404_with_a_reason(served: Served) -> None:
    status, doc, _ = served.call("GET", "/api/v1/vms/nope-99")
    assert (status, doc) == (404, {"detail": "no VM named or with UUID 'nope-99' in the inventory"})


@pytest.mark.parametrize("by", ["vm", "vm-pair", "host-pair"])
@pytest.mark.parametrize("metric", ["bytes", "packets"])
def test_top_is_largest_first_and_matches_the_truth(served: Served, by: str, metric: str) -> None:
    truth, field = _truth(served), "total" if metric == "bytes" else "pkts"
    want: Counter[tuple[str, ...]] = Counter()
    for r in truth:
        if by == "vm":
            for name in {r["src_vm"], r["dst_vm"]}:
                want[(name,)] += r[field]
        else:
            level = "vm" if by == "vm-pair" else "host"
            want[tuple(sorted((r[f"src_{level}"], r[f"dst_{level}"])))] += r[field]
    top = served.get(f"/api/v1/top?by={by}&metric={metric}&limit=5")
    assert (top["by"], top["metric"]) == (by, metric)
    got = [
        ((row["name"],) if by == "vm" else (row["a"], row["b"]), row[metric]) for row in top["top"]
    ]
    assert [v for _, v in got] == sorted((v for v in want.values()), reverse=True)[:5]
    assert all(want[key] == value for key, value in got)


def test_matrix_bins_sum_to_the_truth_per_host_pair(served: Served) -> None:
    truth = _truth(served)
    cells = served.get("/api/v1/matrix?level=host&bin=2")["cells"]
    assert {c["time"] % 2 for c in cells} == {0}
    assert [c["time"] for c in cells] == sorted(c["time"] for c in cells)
    for key in ("bytes", "flows", "intra_bytes", "cross_bytes"):
        got: Counter[tuple[str, str]] = Counter()
        for c in cells:
            got[(c["src"], c["dst"])] += c[key]
        want: Counter[tuple[str, str]] = Counter()
        for r in truth:
            value = {"bytes": r["total"], "flows": 1}.get(key)
            if value is None:
                value = r["total"] if r["scope"] == key.replace("_bytes", "-host") else 0
            want[(r["src_host"], r["dst_host"])] += value
        assert +got == +want, key
    per_bin = Counter(int(r["first_ns"]) // 2_000_000_000 * 2 for r in truth)
    flows_per_bin: Counter[int] = Counter()
    for c in cells:
        flows_per_bin[c["time"]] += c["flows"]
    assert flows_per_bin == per_bin


def test_matrix_by_vm_and_windowed(served: Served) -> None:
    truth = _truth(served)
    t0 = min(int(r["first_ns"]) for r in truth) // 10**9
    since, until = t0 + 2, t0 + 5
    cells = served.get(f"/api/v1/matrix?level=vm&bin=60&since={since}&until={until}")["cells"]
    overlapping = [
        r for r in truth if r["last_ns"] >= since * 10**9 and r["first_ns"] < until * 10**9
    ]
    assert 0 < sum(c["flows"] for c in cells) == len(overlapping)
    assert {(c["src"], c["dst"]) for c in cells} == {
        (r["src_vm"], r["dst_vm"]) for r in overlapping
    }


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/top?by=vm&since=soon", "since"),
        ("/api/v1/top?by=host", "by"),
        ("/api/v1/matrix?bin=0", "bin"),
        ("/api/v1/matrix?level=rack", "level"),
        ("/api/v1/hosts?since=100&until=50", "until"),
        ("/api/v1/top?limit=0", "limit"),
    ],
)
def test_bad_parameters_are_422_naming_them(served: Served, path: str, field: str) -> None:
    status, doc, _ = served.call("GET", path)
    assert status == 422
    assert field in json.dumps(doc["detail"])


def test_sessions_crud_persists_and_feeds_sessions_for(served: Served) -> None:
    web = {"name": "web-debug", "vms": ["web-*"], "snaplen": 128, "direction": "rx"}
    assert served.call("GET", "/api/v1/sessions")[:2] == (200, {"sessions": []})
    assert served.call("POST", "/api/v1/sessions", web)[:2] == (201, web)
    assert served.call("POST", "/api/v1/sessions", web)[0] == 409
    pci = {"name": "pci", "profiles": ["db"]}
    assert served.call("POST", "/api/v1/sessions", pci)[0] == 201
    changed = {**web, "snaplen": 256}
    assert served.call("PUT", "/api/v1/sessions/web-debug", changed)[:2] == (200, changed)
    assert served.get("/api/v1/sessions/web-debug") == changed
    saved = json.loads((served.data.data_dir / "sessions.json").read_text())
    assert saved == {"sessions": [changed, pci]}
    reloaded = SessionStore(served.data.data_dir / "sessions.json")
    reloaded.load()
    assert reloaded.all() == [changed, pci]
    inventory = served.data.cap.inventory()
    web_vms = [vm for vm in inventory.vms if vm.name.startswith("web-")]
    assert reloaded.sessions_for(Host("hv01", 1), web_vms[:1]) == [changed]
    parsed = SessionSet.from_json_value(reloaded.sessions_for(Host("hv01", 1), inventory.vms))
    assert [s.name for s in parsed.sessions] == ["web-debug", "pci"]
    assert served.call("DELETE", "/api/v1/sessions/pci")[0] == 204
    assert served.call("DELETE", "/api/v1/sessions/pci")[:2] == (
        404, {"detail": "no SPAN session named 'pci'"},
    )  # fmt: skip
    assert served.call("PUT", "/api/v1/sessions/pci", pci)[0] == 404
    assert served.call("PUT", "/api/v1/sessions/web-debug", pci)[0] == 409
    served.call("DELETE", "/api/v1/sessions/web-debug")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"name": "x"}, "session 'x' selects nothing"),
        ({"name": "x", "vms": ["a"], "direction": "up"}, "direction: unknown direction 'up'"),
        ({"name": "x", "vms": ["a"], "snaplen": 4}, "snaplen: snaplen 4 below 14"),
        ({"name": "x", "vms": ["a"], "colour": "red"}, "colour: unknown field"),
        ({"name": "x", "vms": ["a"], "filter": "udp port banana"}, "filter: bad capture filter"),
        ({"name": "x", "vms": ["a"], "filter": 7}, "filter: expected a non-empty string"),
        ({"name": "x", "vms": ["a", 5]}, "vms[1]: expected a non-empty string"),
    ],
)
def test_invalid_sessions_are_422_with_the_parsers_reason(
    served: Served, body: dict[str, Any], reason: str
) -> None:
    status, doc, _ = served.call("POST", "/api/v1/sessions", body)
    assert status == 422
    assert doc["detail"].startswith(reason)
    assert served.call("PUT", "/api/v1/sessions/x", body)[0] in (404, 422)
    assert served.get("/api/v1/sessions") == {"sessions": []}  # nothing kept


def _tshark_frames(path: Path) -> list[str]:
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.split()


@pytest.mark.tshark
@needs_tshark
def test_pcap_download_of_a_vm_reads_in_tshark(served: Served, tmp_path: Path) -> None:
    status, body, headers = served.call("GET", "/api/v1/pcap?vm=web-01", raw=True)
    assert status == 200
    assert headers["content-disposition"].startswith("attachment;")
    assert "vspan-web-01.pcapng" in headers["content-disposition"]
    out = tmp_path / "web.pcapng"
    out.write_bytes(body)
    cap = served.data.cap
    vm = cap.inventory().vm("web-01")
    assert vm is not None
    assert len(_tshark_frames(out)) > 0
    status, body, headers = served.call(
        "GET", "/api/v1/pcap?host=hv01&format=pcap&strip_tag=true", raw=True
    )
    assert status == 200
    assert headers["content-type"] == "application/vnd.tcpdump.pcap"
    (tmp_path / "hv01.pcap").write_bytes(body)
    hv01 = next(h.collector_id for h in cap.inventory().hosts if h.name == "hv01")
    assert len(_tshark_frames(tmp_path / "hv01.pcap")) == int(
        (cap.frames.host_column() == hv01).sum()
    )


def test_pcap_of_an_unknown_vm_is_404(served: Served) -> None:
    status, doc, _ = served.call("GET", "/api/v1/pcap?vm=nope-99")
    assert status == 404
    assert "unknown VM 'nope-99'" in doc["detail"]
    assert served.call("GET", "/api/v1/pcap?format=txt")[0] == 422


def test_collectors_get_the_api_sessions_and_vms_gone_leave_the_counts(tmp_path: Path) -> None:
    with serve_views(tmp_path) as served:
        inventory = served.data.cap.inventory()
        web = inventory.vm("web-01")
        assert web is not None
        host = next(h for h in inventory.hosts if h.name == web.host)
        on_host = [vm for vm in inventory.vms if vm.host == host.name]
        gone = next(vm for vm in on_host if vm.name != "web-01")
        session = {"name": "web", "vms": ["web-*"], "snaplen": 96}
        assert served.call("POST", "/api/v1/sessions", session)[0] == 201
        ports = [
            Port(f"vnet{k}", 0, vm.nics[0].vif, vm.nics[0].mac, vm.name, vm.uuid, vm.profile)
            for k, vm in enumerate(on_host) if vm is not gone
        ]  # fmt: skip
        client = ControlClient(served.url, host.collector_id, timeout=10.0)
        config = client.register(host.name, ports)
        assert (config["sessions"], config["sessions_total"]) == ([session], 1)
        assert client.sessions() == [session]
        other = {"name": "other-host", "vms": ["nowhere-*"]}  # selects no VM of this host
        assert served.call("POST", "/api/v1/sessions", other)[0] == 201
        want = {"sessions": [session], "sessions_total": 2, "registered": True}
        assert client.session_state() == want
        assert served.call("DELETE", "/api/v1/sessions/web")[0] == 204
        want = {"sessions": [], "sessions_total": 1, "registered": True}
        assert client.session_state() == want
        assert served.call("DELETE", "/api/v1/sessions/other-host")[0] == 204
        assert client.register(host.name, ports)["sessions_total"] == 0
        hosts = {h["name"]: h for h in served.get("/api/v1/hosts")["hosts"]}
        assert hosts[host.name]["vms"] == len(on_host) - 1
        names = [v["name"] for v in served.get("/api/v1/vms")["vms"]]
        assert gone.name not in names
        assert len(names) == len(inventory.vms) - 1
        assert served.get(f"/api/v1/vms/{gone.name}")["name"] == gone.name  # history is kept
