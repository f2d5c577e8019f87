"""A what-if prediction checked against a real migration in the namespace lab.

The lab: 2 hosts × 3 VMs with the underlay and a management network
(``vspan_testing.netlab``). An ``Analyzer`` (the real component: receivers, engine, inventory
state, store) runs in this process with its UDP socket bound inside ``mgmt`` (``start()`` is
called from a thread switched with ``in_netns``); in each host namespace the real command
``vspan collect --bridge br0 ...`` sends to it. The analyzer knows the hosts and VMs from a
static inventory written once the collectors have assigned their vifs (``vifs.json``).

Phase 1: steady UDP between eight VM pairs at known rates (fixed datagram size and count per
second, intra- and cross-host, paced over ``PERIOD`` seconds); the flows the analyzer stored
give the VM-pair matrix (``vm_matrix`` + ``mean_matrix``), the lab gives the placement, and
``what_if`` predicts the change of cross-host bytes per directed host pair and in total when
``h1v2`` (which talks to VMs on both hosts, both ways) moves to ``h2``.

Phase 2: the VM really migrates: the host side of its veth moves from h1's namespace into
h2's and onto h2's ``br0`` (same MAC, same IP); the collectors drop and pick up the port at
their next discovery refresh, a few pings from the VM update the bridges' tables (the
gratuitous frames of a real live migration), and the analyzer sees the VM's MAC behind a vif
of h2 (a data-plane migration, recorded in its state and in the store). The same traffic runs
again for the same period, and the cross-host bytes of the stored flows, attributed to hosts
by the analyzer itself (``src_host``/``dst_host`` of the records, ``host_matrix``), give the
measured change.

Normalisation: each phase sends the same datagrams (count and size per pair) paced over the
same ``PERIOD``, by a process of its own (so that the sender does not compete with the
analyzer for this interpreter). The flows of a phase (its own UDP destination port) are
shifted by ``-t0``, the phase's start, and binned with one bin of ``WINDOW`` seconds that
holds the whole phase: both matrices are bytes per phase (rates: divide by ``PERIOD``), and
``mean_matrix`` over that one bin is the phase's mean. Frames other than the test's datagrams
(ARP, neighbour discovery, the warm-up pings) are left out by the port filter. Bytes are the
analyzer's flow bytes: the tagged frame's length (Ethernet + IP + UDP + payload + the 6 bytes
of the VN-Tag).

Asserted: in each phase every pair is stored with the analyzer's host attribution matching
the lab (before and after the move) and at most 10 % of its datagrams missed (the analyzer's
socket drops datagrams if its buffer overflows: counted, printed); the prediction's "before"
equals the measured before; the VM-pair matrix of both phases agrees within 10 %; the
measured change is within 10 % of the predicted one for each directed cross-host pair and
for the total; the analyzer recorded one migration h1 → h2 (data plane), in memory and in
the store. Needs root (namespaces); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd
import pytest

from vspan.analysis.predict.whatif import Move, mean_matrix, what_if
from vspan.analysis.records.matrix import host_matrix, pair_class, vm_matrix
from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan_testing import netlab
from vspan_testing.netlab import CollectorProcess, Lab, Mgmt, in_netns

pytestmark = pytest.mark.root

TUNNEL_PORT = 47471
CID = {"h1": 11, "h2": 22}
UPLINK = {"h1": "up-h2", "h2": "up-h1"}
PHASE_PORT = {1: 9101, 2: 9102}
"""The UDP destination port of each phase's datagrams: the phases' flows never mix."""
TICK_PORT = 9199
PERIOD = 4.0
"""Seconds over which each phase's datagrams are paced."""
WINDOW = 10.0
"""Seconds of a phase window (the one matrix bin): the period, plus room for a sender that
falls behind under load (pacing gives up at ``PERIOD + 4``) and the last copies."""
MOVED, TARGET = "h1v2", "h2"
TOLERANCE = 0.10

FLOWS: tuple[tuple[str, str, int, int], ...] = (
    # (source VM, destination VM, datagrams per second, UDP payload bytes)
    ("h1v2", "h1v1", 75, 1000),  # intra-host, becomes cross-host h2 -> h1
    ("h1v3", "h1v2", 50, 600),  # intra-host, becomes cross-host h1 -> h2
    ("h1v2", "h2v1", 60, 1200),  # cross-host h1 -> h2, becomes intra-host
    ("h2v2", "h1v2", 25, 400),  # cross-host h2 -> h1, becomes intra-host
    ("h1v1", "h1v3", 40, 800),  # intra-host, stays
    ("h1v3", "h2v3", 50, 700),  # cross-host h1 -> h2, stays
    ("h2v3", "h1v1", 30, 500),  # cross-host h2 -> h1, stays
    ("h2v2", "h2v3", 35, 900),  # intra-host, stays
)
CROSS = (("h1", "h2"), ("h2", "h1"))


# ---------------------------------------------------------------- the collectors


class Collector(CollectorProcess):
    """A collector of this test: tunnel port ``TUNNEL_PORT``, stats every 0.5 s."""

    def __init__(self, lab: Lab, mgmt: Mgmt, host: str, workdir: Path) -> None:
        super().__init__(
            lab,
            mgmt,
            host,
            cid=CID[host],
            uplink=UPLINK[host],
            port=TUNNEL_PORT,
            workdir=workdir,
            stats_interval="0.5",
        )

    def ports(self) -> int | None:
        """VM ports captured, per the last stats line."""
        found = re.findall(rf"^vspan collect: {self.host}: (\d+) ports", self.stderr(), re.M)
        return int(found[-1]) if found else None

    def wait_ports(self, n: int, deadline: float) -> None:
        while self.ports() != n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"vspan collect on {self.host}: {self.ports()} ports, not {n} "
                    f"(exit {self.proc.poll()}):\n{self.stderr()}"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def collectors(lab: Lab, mgmt: Mgmt, workdir: Path) -> Iterator[dict[str, Collector]]:
    """A collector per host, each capturing its 3 VM ports; always stopped, stderr printed."""
    procs: dict[str, Collector] = {}
    try:
        for host in lab.hosts:
            procs[host] = Collector(lab, mgmt, host, workdir)
        deadline = time.monotonic() + 30
        for proc in procs.values():
            proc.wait_ports(3, deadline)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
        for proc in procs.values():
            lines = proc.stderr().splitlines()
            print(f"----- vspan collect on {proc.host}, last lines of stderr:")
            print("\n".join(lines[-6:]))


def write_inventory(lab: Lab, vifs: Mapping[str, Mapping[str, int]], path: Path) -> None:
    """The lab's hosts and VMs as a static inventory, with the collectors' vifs."""
    doc = {
        "hosts": [{"name": h, "collector_id": CID[h]} for h in sorted(lab.hosts)],
        "vms": [
            {
                "name": vm.name,
                "uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{vm.name}.vspan-lab")),
                "host": vm.host,
                "nics": [{"mac": vm.mac, "vif": vifs[vm.host][vm.port], "ips": [vm.ip]}],
            }
            for vm in sorted(lab.vms.values(), key=lambda v: v.name)
        ],
    }
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML


# ---------------------------------------------------------------- traffic


TRAFFIC = r"""
import contextlib, json, select, socket, sys, threading, time
from vspan_testing.netlab import in_netns

spec = json.loads(sys.argv[1])
flows, port, period = spec["flows"], spec["port"], spec["period"]
received, stop = {}, threading.Event()


def sock_in(ns):
    with in_netns(ns):
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


sinks = {}
for name, (ns, ip) in sorted(spec["sinks"].items()):
    s = sock_in(ns)
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: beyond rmem_max
    s.bind((ip, port))
    s.setblocking(False)
    sinks[s] = name
senders = [sock_in(f["src_ns"]) for f in flows]
by_ip = spec["by_ip"]


def drain():
    while not stop.is_set():
        ready, _, _ = select.select(list(sinks), [], [], 0.05)
        for s in ready:
            with contextlib.suppress(BlockingIOError):
                while True:
                    _, (ip, _) = s.recvfrom(2048)
                    key = f"{by_ip.get(ip, ip)} {sinks[s]}"
                    received[key] = received.get(key, 0) + 1


reader = threading.Thread(target=drain, daemon=True)
reader.start()
total = [int(f["rate"] * period) for f in flows]
sent = [0] * len(flows)
payloads = [bytes(f["size"]) for f in flows]
t0 = time.time_ns()
start = time.monotonic()
while sent != total and time.monotonic() - start < period + 4:
    elapsed = time.monotonic() - start
    for i, f in enumerate(flows):
        due = min(total[i], int(f["rate"] * elapsed) + 1)
        for _ in range(due - sent[i]):
            senders[i].sendto(payloads[i], (f["dst_ip"], port))
        sent[i] = due
    time.sleep(0.01)
time.sleep(0.5)
stop.set()
reader.join(5)
print(json.dumps({"t0": t0, "sent": sent, "total": total, "received": received}))
"""


def run_phase(lab: Lab, port: int) -> tuple[int, Counter[tuple[str, str]]]:
    """Every pair of ``FLOWS`` paced over ``PERIOD`` by a process of its own (not competing
    with the analyzer for this one's interpreter); (start ns, datagrams received per pair).
    Bounded: rate × PERIOD datagrams per pair, pacing gives up at ``PERIOD + 4`` s."""
    vms = lab.vms
    spec = {
        "port": port,
        "period": PERIOD,
        "flows": [
            {"src_ns": vms[s].ns, "dst_ip": vms[d].ip, "rate": rate, "size": size}
            for s, d, rate, size in FLOWS
        ],
        "sinks": {d: (vms[d].ns, vms[d].ip) for _, d, _, _ in FLOWS},
        "by_ip": {vm.ip: vm.name for vm in vms.values()},
    }
    support = str(Path(netlab.__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", TRAFFIC, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=PERIOD + 30,
        env={**os.environ, "PYTHONPATH": support},
        check=False,
    )
    assert done.returncode == 0, f"the traffic process failed:\n{done.stderr}"
    out = json.loads(done.stdout)
    assert out["sent"] == out["total"], f"could not pace the traffic: {out}"
    received = Counter({tuple(key.split(" ")): n for key, n in out["received"].items()})
    return int(out["t0"]), received


def warm_up(analyzer: Analyzer) -> None:
    """Until the engine has processed frames and its queue is empty: its first chunks pay
    for compiling (numba) and opening the ring; a phase must not start behind them."""
    engine, deadline = analyzer.engine, time.monotonic() + 30
    assert engine is not None
    while engine.frames == 0 or not analyzer.chunks.empty():
        assert time.monotonic() < deadline, "the analyzer processed nothing"
        time.sleep(0.05)
    time.sleep(0.2)


def tick(lab: Lab) -> None:
    """One datagram within each host: moves the engine's capture clock on (idle flows end)."""
    for a, b in (("h1v1", "h1v3"), ("h2v1", "h2v3")):
        with lab.socket(lab.vms[a].ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"tick", (lab.vms[b].ip, TICK_PORT))


def stored_phase(analyzer: Analyzer, lab: Lab, phase: int) -> pd.DataFrame:
    """The phase's flow records, once the store has at least one per pair and their number
    and packets stopped changing (ticks end the idle flows: capture time moves only with
    frames, and the idle timeout is 1 s)."""
    port, want = PHASE_PORT[phase], len(FLOWS)
    deadline = time.monotonic() + 20
    last: tuple[int, int] | None = None
    while True:
        tick(lab)
        time.sleep(0.4)
        flows = analyzer.store.query_flows(port=port, limit=None)
        flows = flows[flows["dst_port"] == port]
        now = (len(flows), int(flows["packets"].sum()) if len(flows) else 0)
        if now[0] >= want and now == last:
            return flows.reset_index(drop=True)
        last = now
        if time.monotonic() > deadline:
            raise AssertionError(f"phase {phase}: {now[0]} flows stored, expected {want}")


def windowed(flows: pd.DataFrame, t0: int) -> pd.DataFrame:
    """The flows with times relative to their phase's start: one bin ``[0, WINDOW)``."""
    out = flows.assign(first_ns=flows["first_ns"] - t0, last_ns=flows["last_ns"] - t0)
    window_ns = int(WINDOW * 1e9)
    inside = (out["first_ns"] >= 0) & (out["last_ns"] < window_ns)
    assert inside.all(), f"flows outside the phase window:\n{out[~inside]}"
    return out


def cross_bytes(flows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Bytes per directed cross-host pair per phase window, as the analyzer attributed them."""
    hosts = host_matrix(flows, bin_s=WINDOW)
    assert hosts["bin_ns"].nunique() == 1, hosts
    cross = hosts[pair_class(hosts["src"], hosts["dst"]) == "cross-host"]
    out = dict.fromkeys(CROSS, 0.0)
    for src, dst, octets in zip(cross["src"], cross["dst"], cross["bytes"], strict=True):
        out[(src, dst)] = float(octets)
    return out


def check_attribution(
    flows: pd.DataFrame, placement: Mapping[str, str], phase: int
) -> dict[tuple[str, str], int]:
    """Every pair stored with its ends' hosts those of the lab, and (nearly) every datagram
    (the analyzer's socket may drop datagrams when its buffer overflows); the
    datagrams the analyzer missed per pair."""
    keys = ["src_vm", "dst_vm", "src_host", "dst_host"]
    got = flows.groupby(keys)["packets"].sum().astype(int).to_dict()
    want = {(s, d, placement[s], placement[d]): int(rate * PERIOD) for s, d, rate, _ in FLOWS}
    assert set(got) == set(want), f"phase {phase}: stored {sorted(got)}, expected {sorted(want)}"
    missed = {k[:2]: want[k] - got[k] for k in want}
    assert all(0 <= n <= TOLERANCE * want[k] for k, n in zip(want, missed.values(), strict=True)), (
        f"phase {phase}: datagrams the analyzer missed per pair: {missed}"
    )
    return missed


# ---------------------------------------------------------------- the test


def test_what_if_predicts_a_real_migration(lab: Lab, tmp_path: Path) -> None:
    """Predict the cross-host change of moving h1v2 to h2 from phase 1's stored flows,
    migrate it for real, and measure the change from phase 2's stored flows: within 10 %.
    ``lab``: the 2 hosts × 3 VMs of ``conftest.py``, torn down by its finalizer."""
    started = time.monotonic()
    mgmt = lab.add_mgmt()
    lab.wait_links_up()
    placement = {vm.name: vm.host for vm in lab.vms.values()}
    analyzer: Analyzer | None = None
    try:
        with collectors(lab, mgmt, tmp_path) as procs:
            vifs = {host: proc.vifs() for host, proc in procs.items()}
            inventory = tmp_path / "inventory.yaml"
            write_inventory(lab, vifs, inventory)
            config = AnalyzerConfig(
                udp=f"{mgmt.ip}:{TUNNEL_PORT}",
                tcp=None,
                data_dir=str(tmp_path / "data"),
                inventory=str(inventory),
                idle_timeout=1.0,
                ring_segment_bytes=4 << 20,
                ring_max_bytes=64 << 20,
            )
            analyzer = Analyzer(config)
            with in_netns(mgmt.ns):  # its sockets (and threads) live in mgmt
                analyzer.start()
            analyzer_started = time.time()
            for src, dst, _, _ in FLOWS:  # ARP before the measured traffic
                assert lab.ping(src, lab.vms[dst].ip, 1) == 1, f"{src} -> {dst}"
            warm_up(analyzer)

            # ---- phase 1: measure, then predict
            t1, received1 = run_phase(lab, PHASE_PORT[1])
            before_flows = windowed(stored_phase(analyzer, lab, 1), t1)
            missed1 = check_attribution(before_flows, placement, 1)
            pairs = mean_matrix(vm_matrix(before_flows, bin_s=WINDOW), bin_s=WINDOW)
            prediction = what_if(pairs, placement, [Move(MOVED, TARGET)])
            hp = prediction.host_pairs.set_index(["src", "dst"])
            predicted = {p: float(hp.loc[p, "bytes_delta"]) for p in CROSS}
            predicted_before = {p: float(hp.loc[p, "bytes_before"]) for p in CROSS}
            measured_before = cross_bytes(before_flows)

            # ---- phase 2: migrate for real
            hold = analyzer.state.config.dataplane_hold_s  # sightings held after placement
            time.sleep(max(0.0, analyzer_started + hold + 0.5 - time.time()))
            moved = lab.vms[MOVED]
            target_ns = lab.hosts[TARGET]
            subprocess.run(
                ["ip", "-n", moved.host_ns, "link", "set", moved.port, "netns", target_ns],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                ["ip", "-n", target_ns, "link", "set", moved.port, "master", "br0", "up"],
                check=True,
                capture_output=True,
            )
            with in_netns(target_ns):
                ifindex = socket.if_nametoindex(moved.port)
            lab.vms[MOVED] = dataclasses.replace(
                moved, host=TARGET, host_ns=target_ns, ifindex=ifindex
            )
            lab.wait_links_up()
            deadline = time.monotonic() + 15
            procs[moved.host].wait_ports(2, deadline)
            procs[TARGET].wait_ports(4, deadline)
            new_vif = procs[TARGET].vifs()[moved.port]
            peers = sorted(
                {d for s, d, _, _ in FLOWS if s == MOVED}
                | {s for s, d, _, _ in FLOWS if d == MOVED}
            )
            while True:  # the VM speaks from its new port: bridges and the analyzer learn it
                for peer in peers:
                    lab.ping(MOVED, lab.vms[peer].ip, 1, timeout=0.5)
                snap_vm = analyzer.state.snapshot().vm(MOVED)
                assert snap_vm is not None
                if snap_vm.host == TARGET and [n.vif for n in snap_vm.nics] == [new_vif]:
                    break
                assert time.monotonic() < deadline, f"the analyzer did not see {MOVED} move"
                time.sleep(0.3)
            migrations = [m for m in analyzer.state.migrations() if m.vm_name == MOVED]
            assert analyzer.writer.flush(30.0)  # the store writer is asynchronous
            stored_moves = analyzer.store.query_migrations(vm=MOVED, limit=None)

            t2, received2 = run_phase(lab, PHASE_PORT[2])
            after_flows = windowed(stored_phase(analyzer, lab, 2), t2)
            after_placement = {**placement, MOVED: TARGET}
            missed2 = check_attribution(after_flows, after_placement, 2)
            measured_after = cross_bytes(after_flows)
            after_pairs = mean_matrix(vm_matrix(after_flows, bin_s=WINDOW), bin_s=WINDOW)
            shed = analyzer.counters()["receivers"][0]["kernel_drops"]
    finally:
        if analyzer is not None:
            analyzer.stop()

    measured = {p: measured_after[p] - measured_before[p] for p in CROSS}
    total_pred, total_meas = sum(predicted.values()), sum(measured.values())
    print(f"\nbytes per phase ({PERIOD:g} s of traffic; rates: / {PERIOD:g})")
    for p in CROSS:
        err = (measured[p] - predicted[p]) / abs(predicted[p])
        print(
            f"  {p[0]}->{p[1]}: before {measured_before[p]:,.0f} after {measured_after[p]:,.0f}; "
            f"change predicted {predicted[p]:+,.0f} measured {measured[p]:+,.0f} ({err:+.2%})"
        )
    total_err = (total_meas - total_pred) / abs(total_pred)
    print(
        f"  total cross-host change: predicted {total_pred:+,.0f} measured {total_meas:+,.0f} "
        f"({total_err:+.2%})"
    )
    print(f"  migrations: {migrations}; stored: {stored_moves.to_dict(orient='records')}")
    print(
        f"  tunnel messages shed by the analyzer: {shed}; datagrams it missed per pair: "
        f"phase 1 {missed1}, phase 2 {missed2}"
    )
    print(f"  runtime {time.monotonic() - started:.1f} s")
    print(
        f"  datagrams delivered: phase 1 {sum(received1.values())}, "
        f"phase 2 {sum(received2.values())}"
    )

    sent = {(s, d): int(rate * PERIOD) for s, d, rate, _ in FLOWS}
    assert dict(received1) == sent, "the lab lost datagrams in phase 1"
    assert dict(received2) == sent, "the lab lost datagrams after the migration"
    # the VM-pair matrix is the same traffic before and after: only the placement changed
    merged = pairs.merge(after_pairs, on=["src", "dst"], suffixes=("_1", "_2"))
    assert len(merged) == len(pairs) == len(FLOWS)
    diff = (merged["bytes_2"] - merged["bytes_1"]).abs()
    assert (diff <= TOLERANCE * merged["bytes_1"]).all(), merged
    assert predicted_before == pytest.approx(measured_before)
    assert all(predicted[p] != 0 for p in CROSS)
    assert total_pred != 0
    for p in CROSS:
        assert abs(measured[p] - predicted[p]) <= TOLERANCE * abs(predicted[p]), (p, measured)
    assert abs(total_meas - total_pred) <= TOLERANCE * abs(total_pred), (total_meas, total_pred)
    assert [(m.from_host, m.to_host, str(m.source)) for m in migrations] == [
        ("h1", TARGET, "dataplane")
    ]
    assert stored_moves[["vm_name", "from_host", "to_host", "source"]].values.tolist() == [
        [MOVED, "h1", TARGET, "dataplane"]
    ]
