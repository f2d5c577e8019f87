"""The analyzer end to end: real collectors (replaying simulated hosts) send over loopback UDP
to a real Analyzer; what it stores must match the simulator's ground truth."""

from __future__ import annotations

import itertools
import socket
import struct
import time
from pathlib import Path

import pytest

from vspan.analysis.ring.export import export
from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.analysis.store.store import Store
from vspan.pcap.read import read_capture
from vspan.synth import SynthCapture, generate_small, write_inventory_yaml
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.hosts import replay_hosts
from vspan_testing.measured_analyzer import MeasuredAnalyzer, metric

PROFILES = Path(__file__).resolve().parents[3] / "docs" / "examples" / "profiles.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCapture, Path, Analyzer]:
    folder = tmp_path_factory.mktemp("analyzer")
    cap = generate_small(seed=11)
    write_inventory_yaml(cap, folder / "inventory.yaml")
    config = AnalyzerConfig(
        udp="127.0.0.1:0",
        tcp=None,
        data_dir=str(folder / "data"),
        inventory=str(folder / "inventory.yaml"),
        profiles=str(PROFILES),
    )
    analyzer = Analyzer(config)
    analyzer.start()
    try:
        replay_hosts(cap, analyzer.addresses()["udp"], folder)
        # Wait until every frame the collectors sent has gone through the engine.
        sent = len(cap.frames)
        for _ in range(500):
            assert analyzer.engine is not None
            if analyzer.engine.frames >= sent:
                break

            time.sleep(0.01)
    finally:
        analyzer.stop()
    return cap, folder, analyzer


def test_every_packet_counted_once_in_the_stored_flows(
    run: tuple[SynthCapture, Path, Analyzer],
) -> None:
    cap, folder, analyzer = run
    assert analyzer.engine is not None
    assert analyzer.engine.frames == len(cap.frames)  # every copy arrived
    with Store(folder / "data", read_only=True) as store:
        flows = store.query_flows(limit=None)
    truth = cap.truth
    assert len(flows) == len(truth)
    assert int((flows["packets"] + flows["packets_rev"]).sum()) == int(
        (truth["packets"] + truth["packets_rev"]).sum()
    )
    assert int((flows["bytes"] + flows["bytes_rev"]).sum()) == int(
        (truth["bytes"] + truth["bytes_rev"]).sum()
    )
    assert sorted(flows["scope"]) == sorted(truth["scope"])
    # The simulator puts a cross-host packet's receiver copy 20-200 us after its sender copy.
    cross = flows[flows["scope"] == "cross-host"]
    assert len(cross) > 0
    assert cross["delay_us"].between(20, 200).all()
    assert flows.loc[flows["scope"] != "cross-host", "delay_us"].isna().all()
    by_vm = {v.name: v.uuid for v in cap.vms}
    known = flows["src_vm"].notna()
    assert (
        flows.loc[known, "src_vm_uuid"].astype(str) == flows.loc[known, "src_vm"].map(by_vm)
    ).all()


def test_policy_verdicts_are_stored_and_counted(run: tuple[SynthCapture, Path, Analyzer]) -> None:
    _, folder, analyzer = run
    with Store(folder / "data", read_only=True) as store:
        flows = store.query_flows(limit=None)
        hits = store.query_policy_hits()
    assert set(flows["policy_verdict"].dropna()) <= {"permit", "deny", "none"}
    assert flows["policy_verdict"].notna().all()
    decided = flows[flows["policy_verdict"] != "none"]
    assert len(decided) > 0
    # Hit totals add up to the flows the profiles decided (each end's profile counts).
    assert int(hits["flows"].sum()) >= len(decided)
    assert not analyzer.errors


def test_collectors_and_inventory_history_are_stored(
    run: tuple[SynthCapture, Path, Analyzer],
) -> None:
    cap, folder, _ = run
    with Store(folder / "data", read_only=True) as store:
        counters = store.query_collector_counters()
        history = store.query_inventory_history()
    latest = counters.sort_values("time").groupby("collector_id").tail(1)
    assert sorted(latest["collector_id"]) == [h.collector_id for h in cap.hosts]
    assert int(latest["lost"].sum()) == 0
    assert int(latest["frames"].sum()) == len(cap.frames)
    assert set(history["vm_name"]) == {v.name for v in cap.vms}


def test_the_packet_ring_exports_one_vms_traffic(
    run: tuple[SynthCapture, Path, Analyzer], tmp_path: Path
) -> None:
    cap, folder, _ = run
    vm = cap.vms[0]
    out = tmp_path / "vm.pcapng"
    result = export(folder / "data", out, vm=vm.name, inventory=cap.inventory())
    frames = read_capture(out)
    mac = bytes.fromhex(vm.mac.replace(":", ""))
    touching = [
        i for i in range(len(frames)) if mac in (frames.frame(i)[0:6], frames.frame(i)[6:12])
    ]
    assert result.frames_written == len(frames) == len(touching) > 0
    expected = sum(
        1
        for i in range(len(cap.frames))
        if mac in (cap.frames.frame(i)[0:6], cap.frames.frame(i)[6:12])
    )
    assert len(frames) == expected


def test_a_vm_seen_behind_another_host_in_the_tags_is_a_migration(tmp_path: Path) -> None:

    cap = generate_small(seed=2)
    write_inventory_yaml(cap, tmp_path / "inventory.yaml")
    inventory = cap.inventory()
    vm = inventory.vms[0]
    home = inventory.host(vm.host)
    other = next(h for h in inventory.hosts if h.name != vm.host)
    assert home is not None
    ticks = itertools.count()
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"),
                            inventory=str(tmp_path / "inventory.yaml"))  # fmt: skip
    analyzer = Analyzer(config, clock=lambda: 1_700_000_000.0 + 60.0 * next(ticks))
    analyzer.start()
    try:
        mac = vm.nics[0].mac.to_bytes(6, "big")
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0,
                         bytes([10, 9, 9, 1]), bytes([10, 9, 9, 2]))  # fmt: skip
        frame = (b"\x02" * 6 + mac + b"\x89\x26"
                 + encode_vntag(VnTag(d=0, svif=77, dvif=0, ethertype=0x0800))
                 + ip + struct.pack("!HHHH", 1000, 2000, 8, 0))  # fmt: skip
        message = encode_message(collector_id=other.collector_id, boot_id=1, seq=0,
                                 frames=[frame], ts_ns=[1_700_000_000 * 10**9])  # fmt: skip
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, analyzer.addresses()["udp"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not analyzer.state.migrations():
            time.sleep(0.05)
    finally:
        analyzer.stop()
    moves = analyzer.state.migrations()
    assert [(m.vm_name, m.from_host, m.to_host, str(m.source)) for m in moves] == [
        (vm.name, home.name, other.name, "dataplane")
    ]
    with Store(tmp_path / "data", read_only=True) as store:
        stored = store.query_migrations()
    assert stored["to_host"].tolist() == [other.name]


def test_maintenance_applies_retention_without_errors(tmp_path: Path) -> None:

    config = AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"))
    analyzer = Analyzer(config)
    analyzer.start()
    try:
        time.sleep(1.5)  # the maintenance thread's first round runs retention
    finally:
        analyzer.stop()
    assert analyzer.errors == {}
    metrics = analyzer.writer.metrics()
    assert metrics["writes{retention}"] == 1  # on the store writer's thread
    assert not [k for k in metrics if k.startswith("errors")]


# --- which collectors are accepted -----------------------------------------------------------

KEY = bytes(range(16))
FRAME = bytes(12) + b"\x89\x26" + bytes(4) + b"\x08\x00" + bytes(30)


def _message(cid: int, seq: int, *, key: bytes | None = None) -> bytes:
    return encode_message(collector_id=cid, boot_id=1, seq=seq, frames=[FRAME, FRAME],
                          ts_ns=[1, 2], key=key)  # fmt: skip


def _send_both(analyzer: Analyzer, messages: list[bytes]) -> None:
    """Each message over UDP, then over a TCP connection of its own."""
    addresses = analyzer.addresses()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for m in messages:
            sock.sendto(m, addresses["udp"])
    for m in messages:
        with socket.create_connection(addresses["tcp"]) as conn:
            conn.sendall(m)


def _wait_accounted(analyzer: Analyzer, messages: int) -> None:
    assert analyzer.engine is not None
    deadline = time.monotonic() + 10
    while True:
        totals = analyzer.engine.accounting.totals()
        if totals["received"] + totals["invalid"] + totals.get("stale_boot", 0) >= messages:
            return
        assert time.monotonic() < deadline, totals
        time.sleep(0.02)


def test_keys_alone_accept_only_the_collectors_with_a_key(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(f"5: {KEY.hex()}\n")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp="127.0.0.1:0", data_dir=str(tmp_path / "d"),
                            keys=str(tmp_path / "keys.yaml"))  # fmt: skip
    analyzer = Analyzer(config)
    analyzer.start()
    try:
        # Collector 6 has no key: spec/tunnel.md says configured keys mean known only.
        _send_both(analyzer, [_message(5, 0, key=KEY), _message(6, 0), _message(5, 1, key=KEY)])
        _wait_accounted(analyzer, 6)
    finally:
        analyzer.stop()
    engine = analyzer.engine
    assert engine is not None
    assert engine.frames == 4  # collector 5's two messages (their TCP copies are duplicates)
    invalid = engine.accounting.invalid()
    assert invalid.to_dict("records") == [
        {"collector_id": 0, "reason": "unknown_collector", "messages": 2}
    ]
    assert engine.accounting.collector(6) is None


def test_require_known_accepts_registered_collectors(tmp_path: Path) -> None:
    (tmp_path / "inv.yaml").write_text("hosts:\n  - name: hv1\n    collector_id: 1\nvms: []\n")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp="127.0.0.1:0", data_dir=str(tmp_path / "d"),
                            inventory=str(tmp_path / "inv.yaml"), require_known=True)  # fmt: skip
    analyzer = Analyzer(config)
    analyzer.start()
    engine = analyzer.engine
    assert engine is not None
    try:
        _send_both(analyzer, [_message(1, 0), _message(2, 0)])
        _wait_accounted(analyzer, 4)
        assert engine.frames == 2  # host hv1 of the inventory: accepted, unauthenticated
        assert engine.accounting.invalid()["messages"].sum() == 2
        # Collector 2 registers through the control plane; from then on it is known.
        analyzer.state.register(2, "hv2", [], analyzer.clock())
        _send_both(analyzer, [_message(2, 1)])
        _wait_accounted(analyzer, 6)
    finally:
        analyzer.stop()
    assert engine.frames == 4
    col = engine.accounting.collector(2)
    assert col is not None
    assert col.boot_id == 1


def test_after_a_restart_of_the_analyzer_an_old_boot_is_still_refused(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(f"5: {KEY.hex()}\n")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp="127.0.0.1:0", data_dir=str(tmp_path / "d"),
                            keys=str(tmp_path / "keys.yaml"))  # fmt: skip
    old_boot = encode_message(collector_id=5, boot_id=1000, seq=0, frames=[FRAME], ts_ns=[1],
                              key=KEY)  # fmt: skip
    first = Analyzer(config)
    first.start()
    try:
        _send_both(first, [old_boot])
        _wait_accounted(first, 2)
        _send_both(first, [_message(5, 0, key=KEY)])  # boot 1: older than 1000, refused
        _wait_accounted(first, 4)
        new_boot = encode_message(collector_id=5, boot_id=2000, seq=0, frames=[FRAME],
                                  ts_ns=[2], key=KEY)  # fmt: skip
        _send_both(first, [new_boot])  # the collector restarted
        _wait_accounted(first, 6)
    finally:
        first.stop()  # the counters, with the boots, are saved
    second = Analyzer(config)
    second.start()
    engine = second.engine
    assert engine is not None
    try:
        _send_both(second, [old_boot])  # a capture of the old boot, replayed at once
        following = encode_message(collector_id=5, boot_id=2000, seq=1, frames=[FRAME],
                                   ts_ns=[3], key=KEY)  # fmt: skip
        _send_both(second, [following])
        _wait_accounted(second, 4)
    finally:
        second.stop()
    assert engine.frames == 1  # only the current boot's next message
    col = engine.accounting.collector(5)
    assert col is not None
    assert (col.stale_boot, col.restarts, col.boot_id) == (2, 0, 2000)


def test_vspan_analyze_flooded_with_hostile_collector_ids_stays_small(tmp_path: Path) -> None:
    """``vspan analyze`` receives 200,000 invalid datagrams, each naming another collector
    id, then valid messages from 5,000 collector ids and 2,000 boots of one (over TCP, so
    that none is lost on the way): /metrics stays under 100 KB and the resident memory grows
    by less than 64 MB. (Before, each id got its own series: 200,000 ids made 106 MB of
    /metrics.)"""
    with MeasuredAnalyzer(tmp_path / "data", "--max-collectors", "100",
                          "--max-streams", "200") as analyzer:  # fmt: skip
        udp, tcp = analyzer.addresses["udp"], analyzer.addresses["tcp"]
        good = _message(1, 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(good, udp)
            analyzer.wait_for(lambda: _metric(analyzer, "vspan_frames_total") == 2)
            before = analyzer.rss()
            for cid in range(1000, 201_000):  # cut: bad_length, from 200,000 collector ids
                sock.sendto(good[:8] + cid.to_bytes(4, "big") + good[12:-1], udp)
                if cid % 100 == 0:
                    time.sleep(0.001)  # paced: the kernel keeps every datagram
        with socket.create_connection(tcp) as conn:
            conn.sendall(b"".join(  # valid, from 5,000 collector ids
                good[:8] + cid.to_bytes(4, "big") + good[12:] for cid in range(300_000, 305_000)
            ))  # fmt: skip
            conn.sendall(b"".join(  # valid, 2,000 boots of collector 1
                good[:12] + boot.to_bytes(4, "big") + good[16:] for boot in range(2, 2002)
            ))  # fmt: skip
            analyzer.wait_for(lambda: _metric(analyzer, "vspan_frames_total") == 2 * 7001, 60)
        status, body = analyzer.get("/metrics")
        grown = analyzer.rss() - before
    assert status == 200
    invalid = metric(body.decode(), "vspan_collector_invalid_messages_total",
                     [("collector_id", "0"), ("reason", "bad_length")])  # fmt: skip
    assert invalid == 200_000  # all of them, under collector 0
    assert len(body) < 100_000, f"/metrics is {len(body):,} bytes"
    assert grown < 64 << 20, f"resident memory grew by {grown / 1e6:.0f} MB"


def _metric(analyzer: MeasuredAnalyzer, name: str) -> float | None:
    status, body = analyzer.get("/metrics")
    return metric(body.decode(), name) if status == 200 else None
