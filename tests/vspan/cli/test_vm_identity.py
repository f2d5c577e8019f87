"""VMs without a UUID on the README's path: ``vspan analyze`` as a subprocess with a tokens
file and port-profiles, collectors registering through the real control plane (a collector
token each) VMs they found behind a Linux bridge (no UUID), tunnel traffic this test builds,
a migration (the same VM registered by the other collector), then the API, the query
commands and, after SIGTERM, the store read-only.

Regression (issue 17, point 1): the flows of such VMs were stored, but their migrations,
policy hits and inventory history were not — ``/api/v1/migrations`` gave ``[]`` while the
control plane listed the move, ``vspan policy hits`` ``(no rows)`` while ``vspan policy
violations`` listed the denied flows — and nothing counted what was left out.
``GET /api/v1/vms`` and ``/api/v1/vms/NAME`` answered 500 (``VmRow uuid Input should be a
valid string``). Then the same VMs get a UUID and a new name: what was stored under their
names follows them.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vspan.analysis.store.store import Store
from vspan.collectors.control.client import ControlClient
from vspan.inventory import Port
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.netlab import vspan_command

READ = "vmid-read-0123456789abcdef"
TOKENS = {1: "vmid-collector-1-0123456789", 2: "vmid-collector-2-0123456789"}
HOSTS = {1: "h1", 2: "h2"}
PERMITTED = 7000
"""The destination port ``lab#1`` permits; anything else is ``lab#default`` (deny)."""
PROFILES = f"""\
profiles:
  - name: lab
    default: deny
    vms: ["*-h1v1", "mig-*"]
    rules:
      - permit udp any any eq {PERMITTED}
"""
BOUND = ("web-h1v1", "mig-h1v2")
"""The VMs the profile binds (by the patterns above)."""
VMS = {  # name: (MAC, IPv4); none has a UUID (a collector found them behind a bridge)
    "web-h1v1": (0x0266_0000_0011, "10.66.0.11"),
    "db-h2v1": (0x0266_0000_0021, "10.66.0.21"),
    "mig-h1v2": (0x0266_0000_0022, "10.66.0.22"),
}
WEB_UUID = "0e5e6a11-1111-4111-8111-000000000011"
RENAMED = {"mig2-h1v2": "mig-h1v2"}
"""A new name of a VM (registered with the same MAC)."""


def udp_frame(src: str, dst: str, vifs: dict[str, int], ports: tuple[int, int], n: int) -> bytes:
    """A VN-tagged UDP frame from ``src`` to ``dst``, two VMs of one host (``d=0``, both
    vifs set: intra-host), between ``ports`` (source, destination), ``n`` bytes of payload."""
    sport, dport = ports
    (smac, sip), (dmac, dip) = VMS[src], VMS[dst]
    udp = struct.pack("!HHHH", sport, dport, 8 + n, 0) + bytes(n)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(sip), socket.inet_aton(dip))  # fmt: skip
    tag = encode_vntag(VnTag(d=0, svif=vifs[src], dvif=vifs[dst], ethertype=0x0800))
    return dmac.to_bytes(6, "big") + smac.to_bytes(6, "big") + b"\x89\x26" + tag + ip + udp


class Lab:
    """The analyzer, its two collectors' registrations and what they sent."""

    def __init__(self, analyzer: AnalyzerProcess) -> None:
        self.analyzer = analyzer
        self.seq = dict.fromkeys(HOSTS, 0)
        self.flows: list[dict[str, Any]] = []
        """What was sent, one entry per flow: src, dst, host, dport, packets, bytes."""

    def register(self, cid: int, vms: dict[str, int], uuids: dict[str, str] | None = None) -> None:
        """``POST /api/v1/control/collectors/CID/register`` with the collector's token."""
        uuids = uuids or {}
        ports = [
            Port(f"veth-{n}", 0, vif, VMS[RENAMED.get(n, n)][0], n, uuids.get(n))
            for n, vif in vms.items()
        ]
        ControlClient(self.analyzer.api, cid, token=TOKENS[cid]).register(HOSTS[cid], ports)

    def send(self, cid: int, vifs: dict[str, int], flows: list[tuple[str, str, int, int]]) -> None:
        """One tunnel message of collector ``cid``: per (src, dst, dport, packets), that many
        frames of one flow (source port from the flow's number)."""
        frames: list[bytes] = []
        for src, dst, dport, packets in flows:
            sport = 40000 + len(self.flows)
            mine = [udp_frame(src, dst, vifs, (sport, dport), 10 + i) for i in range(packets)]
            frames += mine
            self.flows.append({"src": src, "dst": dst, "host": HOSTS[cid], "dport": dport,
                               "packets": packets, "bytes": sum(map(len, mine))})  # fmt: skip
        now = time.time_ns()
        message = encode_message(
            collector_id=cid, boot_id=1, seq=self.seq[cid], frames=frames,
            ts_ns=[now + 1000 * i for i in range(len(frames))],
        )  # fmt: skip
        self.seq[cid] += 1
        assert self.analyzer.udp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, self.analyzer.udp)

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(self.analyzer.api + path + query)
        request.add_header("Authorization", f"Bearer {READ}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def cli(self, *argv: str) -> Any:
        """A query command against the running analyzer, its JSON output."""
        done = subprocess.run(
            [*vspan_command(), *argv, "--analyzer", self.analyzer.api, "--token", READ,
             "--format", "json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def expected_hits(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(rule, VM) → (flows, packets, bytes) from what was sent: each end the profile
        binds is decided by ``lab#1`` for the permitted port, else by ``lab#default``."""
        out: Counter[tuple[str, str, str]] = Counter()
        for flow in self.flows:
            rule = "lab#1" if flow["dport"] == PERMITTED else "lab#default"
            for vm in {flow["src"], flow["dst"]} & set(BOUND):
                out[(rule, vm, "flows")] += 1
                out[(rule, vm, "packets")] += flow["packets"]
                out[(rule, vm, "bytes")] += flow["bytes"]
        keys = {(rule, vm) for rule, vm, _ in out}
        return {k: (out[(*k, "flows")], out[(*k, "packets")], out[(*k, "bytes")]) for k in keys}


def _hits(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {(r["rule"], r["vm_name"]): (r["flows"], r["packets"], r["bytes"]) for r in rows}


def _wait_stored(lab: Lab, flows: int, timeout: float = 60.0) -> None:
    """Until ``flows`` flows are stored (closed: they ended after the idle timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = lab.get("/api/v1/flows", limit="1000")["flows"]
        if sum(r["state"] == "closed" for r in rows) >= flows:
            return
        assert time.monotonic() < deadline, (rows, lab.analyzer.stderr())
        time.sleep(0.2)


@pytest.mark.slow
def test_vms_without_a_uuid_keep_their_history_migrations_and_policy_hits(
    tmp_path: Path,
) -> None:
    data, profiles, tokens = tmp_path / "data", tmp_path / "profiles.yaml", tmp_path / "t.yaml"
    profiles.write_text(PROFILES)
    tokens.write_text(
        f"{READ}: read\n" + "".join(f"{t}: collector:{c}\n" for c, t in TOKENS.items())
    )
    analyzer = AnalyzerProcess(
        ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0", "--data-dir", str(data),
         "--profiles", str(profiles), "--tokens", str(tokens), "--idle-timeout", "1"],
        stderr_path=tmp_path / "analyze.stderr",
    ).wait_started()  # fmt: skip
    lab = Lab(analyzer)
    try:
        on_h1, on_h2 = {"web-h1v1": 1}, {"db-h2v1": 1, "mig-h1v2": 2}
        lab.register(1, on_h1)
        lab.register(2, on_h2)
        lab.send(2, on_h2, [("mig-h1v2", "db-h2v1", 9000, 3), ("db-h2v1", "mig-h1v2", 7000, 2)])
        _wait_stored(lab, 2)
        # mig-h1v2 moves to h1: h1 registers it (same MAC, new vif), h2 no longer has it.
        on_h1 = {"web-h1v1": 1, "mig-h1v2": 2}
        lab.register(1, on_h1)
        lab.register(2, {"db-h2v1": 1})
        lab.send(1, on_h1, [("web-h1v1", "mig-h1v2", 7000, 4), ("mig-h1v2", "web-h1v1", 9000, 5)])
        _wait_stored(lab, 4)

        # The VMs, listed and one by one (a 500 before).
        listed = {v["name"]: v for v in lab.get("/api/v1/vms")["vms"]}
        assert {n: (v["uuid"], v["host"]) for n, v in listed.items()} == {
            "web-h1v1": (None, "h1"), "db-h2v1": (None, "h2"), "mig-h1v2": (None, "h1"),
        }  # fmt: skip
        for name, vm in listed.items():
            mine = [f for f in lab.flows if name in (f["src"], f["dst"])]
            assert (vm["flows"], vm["packets"], vm["bytes"]) == (
                len(mine), sum(f["packets"] for f in mine), sum(f["bytes"] for f in mine)
            ), name  # fmt: skip
        mig = lab.get("/api/v1/vms/mig-h1v2")
        assert (mig["uuid"], mig["host"]) == (None, "h1")
        assert [h["host"] for h in mig["host_history"]] == ["h2", "h1"]
        assert [(m["vm_name"], m["vm_uuid"], m["from_host"], m["to_host"], m["source"])
                for m in mig["migrations"]] == [("mig-h1v2", None, "h2", "h1", "inventory")]  # fmt: skip
        assert _hits(mig["policy_hits"]) == {
            k: v for k, v in lab.expected_hits().items() if k[1] == "mig-h1v2"
        }

        # The migration and the hits, on the API and from the query commands.
        moves = lab.get("/api/v1/migrations")["migrations"]
        assert [(m["vm_name"], m["vm_uuid"], m["from_host"], m["to_host"]) for m in moves] == [
            ("mig-h1v2", None, "h2", "h1")
        ]
        assert (moves[0]["flows_before"], moves[0]["flows_after"]) == (2, 2)
        assert lab.cli("migrations") == moves
        assert lab.cli("migrations", "--vm", "mig-h1v2") == moves
        assert lab.cli("migrations", "--vm", "web-h1v1") == []
        hits = lab.get("/api/v1/policies/hits")["hits"]
        assert _hits(hits) == lab.expected_hits()
        assert len(hits) == len(lab.expected_hits()) == 4
        assert {h["vm_uuid"] for h in hits} == {None}
        assert lab.cli("policy", "hits") == hits
        assert _hits(lab.cli("policy", "hits", "--vm", "web-h1v1")) == {
            k: v for k, v in lab.expected_hits().items() if k[1] == "web-h1v1"
        }
        denied = lab.cli("policy", "violations")
        assert len(denied) == sum(f["dport"] != PERMITTED for f in lab.flows) == 2

        # Nothing was left out: every row written, none rejected.
        store = lab.get("/api/v1/status")["store"]
        assert store["written"]["migrations"] == {"rows": 1}
        assert store["written"]["inventory_history"] == {"rows": len(VMS)}  # each added once
        assert {t: r for t, r in store["rejected"].items() if r} == {}

        # web-h1v1 gets a UUID, mig-h1v2 a new name (same MAC): what was stored follows them.
        lab.register(1, {"web-h1v1": 1, "mig2-h1v2": 2}, uuids={"web-h1v1": WEB_UUID})
        deadline = time.monotonic() + 30  # the rows move on the store writer's thread
        while any(
            lab.get("/api/v1/policies/hits", vm=v)["hits"] == [] for v in (WEB_UUID, "mig2-h1v2")
        ):
            assert time.monotonic() < deadline, analyzer.stderr()
            time.sleep(0.2)
        web_hits = lab.get("/api/v1/policies/hits", vm=WEB_UUID)["hits"]
        assert _hits(web_hits) == {
            k: v for k, v in lab.expected_hits().items() if k[1] == "web-h1v1"
        }
        assert {h["vm_uuid"] for h in web_hits} == {WEB_UUID}
        assert _hits(lab.cli("policy", "hits", "--vm", "mig2-h1v2")) == {
            k: v for k, v in lab.expected_hits().items() if k[1] == "mig-h1v2"
        }
        renamed = lab.cli("migrations", "--vm", "mig2-h1v2")
        assert [(m["vm_name"], m["from_host"], m["to_host"]) for m in renamed] == [
            ("mig-h1v2", "h2", "h1")
        ]
        detail = lab.get("/api/v1/vms/mig2-h1v2")
        assert [(m["vm_name"], m["from_host"], m["to_host"], m["vm_key"])
                for m in detail["migrations"]] == [("mig-h1v2", "h2", "h1", "name:mig2-h1v2")]  # fmt: skip
        assert _hits(detail["policy_hits"]) == _hits(mig["policy_hits"])
        assert lab.get(f"/api/v1/vms/{WEB_UUID}")["uuid"] == WEB_UUID
    finally:
        summary = analyzer.stop()
    assert summary.stored == len(lab.flows), summary.line

    with Store(data, read_only=True) as stored:
        history = stored.query_inventory_history(limit=None)
        moves_db = stored.query_migrations(limit=None)
        hits_db = stored.query_policy_hits(limit=None)
    added = history[history["event"] == "added"]
    assert sorted(zip(added["vm_name"], added["host"], strict=True)) == sorted(
        [("web-h1v1", "h1"), ("db-h2v1", "h2"), ("mig-h1v2", "h2")]
    )
    assert sorted(history["vm_key"].unique()) == sorted(
        [WEB_UUID, "name:db-h2v1", "name:mig2-h1v2"]
    )
    assert [(m.vm_key, m.vm_name, m.from_host, m.to_host) for m in moves_db.itertuples()] == [
        ("name:mig2-h1v2", "mig-h1v2", "h2", "h1")
    ]
    keys = {"web-h1v1": WEB_UUID, "mig-h1v2": "name:mig2-h1v2"}
    assert {(h.rule, h.vm_key): (h.flows, h.packets, h.bytes) for h in hits_db.itertuples()} == {
        (rule, keys[vm]): counts for (rule, vm), counts in lab.expected_hits().items()
    }
    # The query commands on the data directory: by either name, by the UUID it got later.
    for argv, want in (
        (["migrations", "--vm", "mig2-h1v2"], {("mig-h1v2", "h2", "h1")}),
        (["migrations", "--vm", "mig-h1v2"], {("mig-h1v2", "h2", "h1")}),
        (
            ["policy", "hits", "--vm", WEB_UUID],
            {("lab#1", "web-h1v1"), ("lab#default", "web-h1v1")},
        ),
        (
            ["policy", "hits", "--vm", "mig-h1v2"],
            {("lab#1", "mig-h1v2"), ("lab#default", "mig-h1v2")},
        ),
    ):
        done = subprocess.run(
            [*vspan_command(), *argv, "--data-dir", str(data), "--format", "json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        keys = (
            ("vm_name", "from_host", "to_host") if argv[0] == "migrations" else ("rule", "vm_name")
        )
        assert {tuple(r[k] for k in keys) for r in rows} == want, argv
