"""The analyzer with VMs that have no UUID (registered as a collector finds them behind a Linux
bridge): a move the data plane sees is a stored migration, and policy hits go on adding up
under the VM's name across a restart of the analyzer.

Regression (issue 17, point 1): both were left out of the store, silently.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vspan.analysis.decode import decode_batch
from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.table import FlowTable
from vspan.analysis.inventory.snapshot import InventoryEvent, InventorySnapshot
from vspan.analysis.inventory.state import PortInfo
from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.analysis.store.store import Store
from vspan.batch import FrameBatch
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag

MAC = {"a": 0x0266_0000_0001, "b": 0x0266_0000_0002}
IP = {"a": bytes([10, 66, 0, 1]), "b": bytes([10, 66, 0, 2])}
T0 = 1_700_000_000


def _frame(src: str, dst: str, svif: int, dvif: int, payload: int) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9000, 8 + payload, 0) + bytes(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, IP[src], IP[dst])
    tag = encode_vntag(VnTag(d=0, svif=svif, dvif=dvif, ethertype=0x0800))
    return MAC[dst].to_bytes(6, "big") + MAC[src].to_bytes(6, "big") + b"\x89\x26" + tag + ip + udp


def _send(analyzer: Analyzer, cid: int, seq: int, frames: list[bytes], t_ns: int) -> None:
    message = encode_message(collector_id=cid, boot_id=seq + 1, seq=0, frames=frames,
                             ts_ns=[t_ns + i for i in range(len(frames))])  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(message, analyzer.addresses()["udp"])


def _until(check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _received(analyzer: Analyzer, frames: int) -> bool:
    return analyzer.engine is not None and analyzer.engine.counters()["frames"] >= frames


def test_a_move_the_data_plane_sees_is_a_stored_migration(tmp_path: Path) -> None:
    ticks = itertools.count()
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"))
    analyzer = Analyzer(config, clock=lambda: T0 + 60.0 * next(ticks))
    analyzer.start()
    try:
        analyzer.state.register(1, "h1", [PortInfo("a", 1, MAC["a"])], analyzer.clock())
        analyzer.state.register(2, "h2", [PortInfo("b", 1, MAC["b"])], analyzer.clock())
        # a's frames now come tagged by h2's collector, behind a vif h2 did not register.
        _send(analyzer, 2, 0, [_frame("a", "b", 7, 1, 10)], T0 * 10**9)
        _until(analyzer.state.migrations, "no migration seen")
    finally:
        analyzer.stop()
    with Store(tmp_path / "data", read_only=True) as store:
        moves = store.query_migrations(vm="a")
        added = store.query_inventory_history()
    assert (len(moves), len(added)) == (1, 2)
    assert moves[["vm_key", "vm_name", "from_host", "to_host", "source"]].values.tolist() == [
        ["name:a", "a", "h1", "h2", "dataplane"]
    ]
    assert moves["vm_uuid"].isna().all()
    assert sorted(added["vm_key"]) == ["name:a", "name:b"]


def test_hits_of_a_vm_without_a_uuid_add_up_across_a_restart(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  - {name: lab, default: deny, vms: [a]}\n")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"),
                            profiles=str(profiles))  # fmt: skip
    sent = []
    for run in range(2):
        analyzer = Analyzer(config)
        analyzer.start()
        try:
            ports = [PortInfo("a", 1, MAC["a"]), PortInfo("b", 2, MAC["b"])]
            analyzer.state.register(1, "h1", ports, analyzer.clock())
            frames = [_frame("a", "b", 1, 2, 10 + i) for i in range(3 + run)]
            sent.append(frames)
            _send(analyzer, 1, run, frames, (T0 + 3600 * run) * 10**9)
            _until(partial(_received, analyzer, len(frames)), "frames not received")
        finally:
            analyzer.stop()  # the open flow is finished, stored, and its hits added up
    with Store(tmp_path / "data", read_only=True) as store:
        hits = store.query_policy_hits(vm="a")
        history = store.query_inventory_history(vm="a")
    assert (len(hits), len(history)) == (1, 2)
    assert hits[["rule", "vm_key", "vm_name", "flows", "packets", "bytes"]].values.tolist() == [
        ["lab#default", "name:a", "a", 2, sum(map(len, sent)), sum(len(f) for s in sent for f in s)]
    ]
    assert history["event"].tolist() == ["added", "added"]  # once per run, one VM
    assert history["vm_key"].unique().tolist() == ["name:a"]


def test_hits_of_flows_read_before_a_rename_follow_the_vm(tmp_path: Path) -> None:
    # The engine reads the inventory as flows end, then queues them for the store writer; a
    # registration renaming the VM (another thread) may come in between. Those flows' hits,
    # built under the old name, must still end up under the new one.
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  - {name: lab, default: deny, vms: ['a*']}\n")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"),
                            profiles=str(profiles))  # fmt: skip
    analyzer = Analyzer(config)
    analyzer.start()
    try:
        state, b = analyzer.state, PortInfo("b", 2, MAC["b"])
        state.register(1, "h1", [PortInfo("a", 1, MAC["a"]), b], analyzer.clock())
        frames = [_frame("a", "b", 1, 2, 10 + i) for i in range(3)]
        dec = decode_batch(FrameBatch.from_frames(frames, ts_ns=[T0 * 10**9] * 3, host=[1] * 3))
        table = FlowTable()
        table.update_rows(dec, EndpointResolver(state.snapshot()).resolve(dec))
        ended = table.flush_rows()

        renamed, in_sink, sink = threading.Event(), threading.Event(), state.history_sink
        assert sink is not None

        def entering_sink(event: InventoryEvent) -> None:
            in_sink.set()
            sink(event)

        def rename() -> None:
            state.register(1, "h1", [PortInfo("a2", 1, MAC["a"]), b], analyzer.clock())
            renamed.set()

        read, tester = state.snapshot, threading.current_thread()

        def read_then_rename() -> InventorySnapshot:
            before = read()
            if threading.current_thread() is tester:  # the engine's own reads untouched
                state.history_sink = entering_sink
                threading.Thread(target=rename, daemon=True).start()
                assert in_sink.wait(20), "the rename did not reach the history sink"
                renamed.wait(1.0)  # done at once, unless the analyzer holds it back
            return before

        state.snapshot = read_then_rename  # type: ignore[method-assign]
        analyzer._on_flows(ended)  # as the engine does when flows end
        state.snapshot = read  # type: ignore[method-assign]
        assert renamed.wait(20), "the rename did not finish"
        assert analyzer.writer.flush()
    finally:
        analyzer.stop()
    with Store(tmp_path / "data", read_only=True) as store:
        hits = store.query_policy_hits()
    assert hits[["rule", "vm_key", "vm_name", "flows", "packets"]].values.tolist() == [
        ["lab#default", "name:a2", "a", 1, 3]
    ]
